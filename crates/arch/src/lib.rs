//! Guest platform setup for x86_64: memory map, boot protocols, vCPU registers, CPUID, ACPI.
