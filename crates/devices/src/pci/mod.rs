//! The PCI host bridge: config space through ports 0xCF8/0xCFC and ECAM, BARs, MSI-X.
