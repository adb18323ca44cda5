//! Legacy platform devices: serial port, i8042 reset, power-off and debug-exit ports.
