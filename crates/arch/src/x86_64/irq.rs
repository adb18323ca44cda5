//! x86_64 interrupt routing: the legacy IRQs of the PIC pair and the IOAPIC, and the shape of
//! an MSI route.

use kvm_bindings::{
    kvm_irq_routing_entry, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};

use super::layout::MSI_GSI_BASE;

/// Number of IOAPIC pins: GSIs below this are routed to the irqchips, never to MSI.
pub const IRQCHIP_PINS: u32 = 24;

const _: () = assert!(
    MSI_GSI_BASE >= IRQCHIP_PINS,
    "MSI GSIs overlap the IOAPIC pins"
);

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = irqchip;
    e.u.irqchip.pin = pin;
    e
}

/// The routes every legacy IRQ needs: GSI n to IOAPIC pin n (0..24), and GSIs 0..16 except
/// the cascade (2) also to the master (0..8) or slave (8..16) PIC, as KVM's default table
/// does. Built when a VM starts, not per interrupt.
pub fn legacy_irq_routes() -> Vec<kvm_irq_routing_entry> {
    let mut entries = Vec::with_capacity(40);
    for gsi in 0..IRQCHIP_PINS {
        entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 && gsi != 2 {
            let (chip, pin) = if gsi < 8 {
                (KVM_IRQCHIP_PIC_MASTER, gsi)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
            };
            entries.push(irqchip_entry(gsi, chip, pin));
        }
    }
    entries
}

/// The route of an MSI on `gsi` that writes `data` to `address` (the LAPIC's window); the
/// requester id `_devid` matters only to an arm64 ITS.
pub fn msi_route(gsi: u32, address: u64, data: u32, _devid: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    // The 64-bit address is split into its two halves; the masks make the truncation explicit.
    e.u.msi.address_lo = (address & 0xffff_ffff) as u32;
    e.u.msi.address_hi = (address >> 32) as u32;
    e.u.msi.data = data;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_routes_cover_the_ioapic_and_both_pics_but_not_the_cascade() {
        let routes = legacy_irq_routes();
        // 24 IOAPIC pins and 15 PIC pins.
        assert_eq!(routes.len(), 39);
        let chips_of = |gsi: u32| -> Vec<(u32, u32)> {
            routes
                .iter()
                .filter(|r| r.gsi == gsi)
                // SAFETY: every entry built by legacy_irq_routes is of type IRQCHIP, so the
                // irqchip member of the union is the initialised one.
                .map(|r| unsafe { (r.u.irqchip.irqchip, r.u.irqchip.pin) })
                .collect()
        };
        assert_eq!(
            chips_of(4),
            vec![(KVM_IRQCHIP_IOAPIC, 4), (KVM_IRQCHIP_PIC_MASTER, 4)]
        );
        assert_eq!(
            chips_of(9),
            vec![(KVM_IRQCHIP_IOAPIC, 9), (KVM_IRQCHIP_PIC_SLAVE, 1)]
        );
        assert_eq!(chips_of(2), vec![(KVM_IRQCHIP_IOAPIC, 2)]);
        assert_eq!(chips_of(20), vec![(KVM_IRQCHIP_IOAPIC, 20)]);
    }

    #[test]
    fn msi_route_splits_the_address() {
        let r = msi_route(30, 0x1_fee0_1000, 0x4041, 0x18);
        assert_eq!((r.gsi, r.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: msi_route builds an MSI entry, so the msi member is the initialised one.
        let msi = unsafe { r.u.msi };
        assert_eq!(
            (msi.address_lo, msi.address_hi, msi.data),
            (0xfee0_1000, 1, 0x4041)
        );
    }
}
