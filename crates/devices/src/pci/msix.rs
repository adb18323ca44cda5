//! MSI-X: the capability, the vector table and the pending-bit array (PBA).
//!
//! Every vector owns an irqfd and a GSI from [`VmHooks::allocate_msi`]. The GSI is routed to the
//! vector's (address, data) whenever the vector can fire (MSI-X enabled, function and vector
//! unmasked) and unrouted otherwise; a vector that fires while masked sets its pending bit and is
//! delivered when it is unmasked.

use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{PciError, VmHooks};

/// PCI capability ID of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
/// Bytes per MSI-X table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Maximum number of vectors a function can have.
pub const MAX_VECTORS: usize = 2048;
/// Message control: MSI-X enable.
pub const MSG_CTL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const MSG_CTL_FUNCTION_MASK: u16 = 1 << 14;
/// Length of the capability body after the ID/next bytes.
pub const CAP_BODY_LEN: usize = 10;

const VECTOR_CTL_MASK: u32 = 1;

#[derive(Debug, Clone, Copy)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctl: u32,
}

impl Entry {
    fn address(&self) -> u64 {
        (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo)
    }

    fn masked(&self) -> bool {
        self.ctl & VECTOR_CTL_MASK != 0
    }

    fn dword(&self, i: usize) -> u32 {
        match i {
            0 => self.addr_lo,
            1 => self.addr_hi,
            2 => self.data,
            _ => self.ctl,
        }
    }
}

struct Vector {
    gsi: u32,
    irqfd: EventFd,
    /// The (address, data) the GSI is currently routed to, if routed.
    route: Option<(u64, u32)>,
}

/// The guest-visible MSI-X state of one function, for snapshots (GSIs and irqfds are host
/// resources and are allocated afresh on restore).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    /// Each vector's table entry: address low, address high, data, vector control.
    pub entries: Vec<[u32; 4]>,
    /// The pending-bit array.
    pub pba: Vec<u64>,
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_mask: bool,
}

/// The MSI-X state of one function.
pub struct MsixConfig {
    entries: Vec<Entry>,
    pba: Vec<u64>,
    vectors: Vec<Vector>,
    enabled: bool,
    function_mask: bool,
    /// The function's requester id, which every route carries (0 until it is on a bus).
    requester_id: u32,
    hooks: Arc<dyn VmHooks>,
}

impl MsixConfig {
    /// `num_vectors` vectors (1..=2048), each with an irqfd bound to a freshly allocated GSI.
    pub fn new(num_vectors: usize, hooks: Arc<dyn VmHooks>) -> Result<Self, PciError> {
        if num_vectors == 0 || num_vectors > MAX_VECTORS {
            return Err(PciError::BadVectorCount(num_vectors));
        }
        let mut vectors = Vec::with_capacity(num_vectors);
        for _ in 0..num_vectors {
            let irqfd = EventFd::new(EFD_NONBLOCK)?;
            let gsi = hooks.allocate_msi(&irqfd)?;
            vectors.push(Vector {
                gsi,
                irqfd,
                route: None,
            });
        }
        let masked = Entry {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            ctl: VECTOR_CTL_MASK,
        };
        Ok(MsixConfig {
            entries: vec![masked; num_vectors],
            pba: vec![0; num_vectors.div_ceil(64)],
            vectors,
            enabled: false,
            function_mask: false,
            requester_id: 0,
            hooks,
        })
    }

    /// Sets the function's requester id and routes the live vectors again with it.
    pub fn set_requester_id(&mut self, id: u16) {
        self.requester_id = u32::from(id);
        for v in &self.vectors {
            if let Some((address, data)) = v.route {
                if let Err(err) =
                    self.hooks
                        .set_msi_route(v.gsi, address, data, self.requester_id, true)
                {
                    crate::guest_warn!("MSI-X: routing GSI {} failed: {err}", v.gsi);
                }
            }
        }
    }

    /// The guest-visible state.
    pub fn save_state(&self) -> MsixState {
        MsixState {
            entries: self
                .entries
                .iter()
                .map(|e| [e.addr_lo, e.addr_hi, e.data, e.ctl])
                .collect(),
            pba: self.pba.clone(),
            enabled: self.enabled,
            function_mask: self.function_mask,
        }
    }

    /// Applies a snapshot's state and reprograms the KVM routes to match; a state with another
    /// number of vectors is refused.
    pub fn restore_state(&mut self, state: &MsixState) -> Result<(), PciError> {
        if state.entries.len() != self.entries.len() || state.pba.len() != self.pba.len() {
            return Err(PciError::BadVectorCount(state.entries.len()));
        }
        for (e, s) in self.entries.iter_mut().zip(&state.entries) {
            *e = Entry {
                addr_lo: s[0],
                addr_hi: s[1],
                data: s[2],
                ctl: s[3] & VECTOR_CTL_MASK,
            };
        }
        self.pba.copy_from_slice(&state.pba);
        // Bits past the last vector are never set.
        let n = self.entries.len();
        if !n.is_multiple_of(64) {
            if let Some(last) = self.pba.last_mut() {
                *last &= (1u64 << (n % 64)) - 1;
            }
        }
        self.enabled = state.enabled;
        self.function_mask = state.function_mask;
        for v in 0..n {
            self.update_route(v);
        }
        Ok(())
    }

    /// Number of vectors.
    pub fn num_vectors(&self) -> usize {
        self.entries.len()
    }

    /// Size in bytes of the vector table.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Size in bytes of the PBA (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    /// The GSI of `vector`.
    pub fn gsi(&self, vector: usize) -> Option<u32> {
        self.vectors.get(vector).map(|v| v.gsi)
    }

    /// The capability body (message control, table and PBA locations) for config space.
    pub fn capability_body(&self, bar: u8, table_offset: u32, pba_offset: u32) -> [u8; 10] {
        let mut b = [0u8; CAP_BODY_LEN];
        // Table size N - 1 in 11 bits; `new` refuses more than 2048 vectors.
        let ctl = u16::try_from(self.entries.len() - 1).unwrap_or(0x7ff) & 0x7ff;
        b[0..2].copy_from_slice(&ctl.to_le_bytes());
        b[2..6].copy_from_slice(&((table_offset & !7) | u32::from(bar & 7)).to_le_bytes());
        b[6..10].copy_from_slice(&((pba_offset & !7) | u32::from(bar & 7)).to_le_bytes());
        b
    }

    /// Write mask of the capability body: only the enable and function-mask bits.
    pub fn capability_write_mask() -> [u8; CAP_BODY_LEN] {
        let mut m = [0u8; CAP_BODY_LEN];
        m[1] = ((MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK) >> 8) as u8;
        m
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Applies the enable and function-mask bits of a message control value.
    pub fn set_message_control(&mut self, ctl: u16) {
        let enabled = ctl & MSG_CTL_ENABLE != 0;
        let function_mask = ctl & MSG_CTL_FUNCTION_MASK != 0;
        if enabled == self.enabled && function_mask == self.function_mask {
            return;
        }
        self.enabled = enabled;
        self.function_mask = function_mask;
        for v in 0..self.entries.len() {
            self.update_route(v);
            self.deliver_pending(v);
        }
    }

    /// The guest reads the vector table.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| {
                    let dw = usize::try_from(o / 4).ok()?;
                    let e = self.entries.get(dw / 4)?;
                    Some(e.dword(dw % 4).to_le_bytes()[(o % 4) as usize])
                })
                .unwrap_or(0);
        }
    }

    /// The guest writes the vector table (any size; applied dword by dword).
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let Some(end) = offset.checked_add(data.len() as u64) else {
            return;
        };
        if data.is_empty() || end > self.table_size() {
            return;
        }
        let (Ok(start), Ok(end)) = (usize::try_from(offset), usize::try_from(end)) else {
            return;
        };
        let mut dw = start / 4;
        while dw * 4 < end {
            let (entry, field) = (dw / 4, dw % 4);
            let Some(e) = self.entries.get(entry) else {
                return;
            };
            let mut bytes = e.dword(field).to_le_bytes();
            for (k, b) in bytes.iter_mut().enumerate() {
                let at = dw * 4 + k;
                if let Some(&v) = at.checked_sub(start).and_then(|i| data.get(i)) {
                    *b = v;
                }
            }
            self.write_dword(entry, field, u32::from_le_bytes(bytes));
            dw += 1;
        }
    }

    fn write_dword(&mut self, v: usize, field: usize, value: u32) {
        let e = &mut self.entries[v];
        match field {
            0 => e.addr_lo = value,
            1 => e.addr_hi = value,
            2 => e.data = value,
            _ => e.ctl = value & VECTOR_CTL_MASK,
        }
        self.update_route(v);
        if field == 3 {
            self.deliver_pending(v);
        }
    }

    /// The guest reads the PBA (writes to it are ignored).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| {
                    let q = self.pba.get(usize::try_from(o / 8).ok()?)?;
                    Some(q.to_le_bytes()[(o % 8) as usize])
                })
                .unwrap_or(0);
        }
    }

    /// Whether `vector`'s pending bit is set.
    pub fn pending(&self, vector: usize) -> bool {
        self.pba
            .get(vector / 64)
            .is_some_and(|q| q & (1 << (vector % 64)) != 0)
    }

    /// Fires `vector`: injects it, or sets its pending bit if it is masked. Does nothing for a
    /// vector out of range or while MSI-X is disabled.
    pub fn trigger(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.entries.len() || !self.enabled {
            return;
        }
        if self.function_mask || self.entries[v].masked() {
            self.pba[v / 64] |= 1 << (v % 64);
            return;
        }
        self.inject(v);
    }

    fn inject(&self, v: usize) {
        if let Err(e) = self.vectors[v].irqfd.write(1) {
            crate::guest_warn!("MSI-X vector {v}: irqfd write failed: {e}");
        }
    }

    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_mask && !self.entries[v].masked()
    }

    fn deliver_pending(&mut self, v: usize) {
        if self.pending(v) && self.deliverable(v) {
            self.pba[v / 64] &= !(1 << (v % 64));
            self.inject(v);
        }
    }

    /// Brings the KVM route of `v` in line with its entry and mask state.
    fn update_route(&mut self, v: usize) {
        let e = self.entries[v];
        let want = self.deliverable(v).then(|| (e.address(), e.data));
        let vec = &mut self.vectors[v];
        if want == vec.route {
            return;
        }
        let (address, data) = want.or(vec.route).unwrap_or_default();
        if let Err(err) =
            self.hooks
                .set_msi_route(vec.gsi, address, data, self.requester_id, want.is_some())
        {
            crate::guest_warn!("MSI-X vector {v}: routing GSI {} failed: {err}", vec.gsi);
        }
        vec.route = want;
    }
}

impl Drop for MsixConfig {
    fn drop(&mut self) {
        for v in &self.vectors {
            if let Some((address, data)) = v.route {
                let _ = self
                    .hooks
                    .set_msi_route(v.gsi, address, data, self.requester_id, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::testing::{FakeHooks, HookCall};

    fn setup(n: usize) -> (Arc<FakeHooks>, MsixConfig) {
        let hooks = Arc::new(FakeHooks::default());
        let m = MsixConfig::new(n, hooks.clone()).unwrap();
        (hooks, m)
    }

    fn program(m: &mut MsixConfig, v: u64, addr: u64, data: u32) {
        let base = v * MSIX_ENTRY_SIZE;
        let (lo, hi) = crate::pci::config::split_u64(addr);
        m.table_write(base, &lo.to_le_bytes());
        m.table_write(base + 4, &hi.to_le_bytes());
        m.table_write(base + 8, &data.to_le_bytes());
        m.table_write(base + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn rejects_bad_vector_counts() {
        let hooks = Arc::new(FakeHooks::default());
        assert!(MsixConfig::new(0, hooks.clone()).is_err());
        assert!(MsixConfig::new(MAX_VECTORS + 1, hooks).is_err());
    }

    #[test]
    fn routes_follow_table_and_enable() {
        let (hooks, mut m) = setup(3);
        let gsi = m.gsi(1).unwrap();
        assert!(gsi >= 24);
        program(&mut m, 1, 0xfee0_1000, 0x4041);
        // Not enabled yet: no route.
        assert!(hooks.routes().is_empty());
        m.set_message_control(MSG_CTL_ENABLE);
        assert_eq!(
            hooks.routes(),
            vec![HookCall::SetMsiRoute {
                gsi,
                address: 0xfee0_1000,
                data: 0x4041,
                devid: 0,
                enabled: true
            }]
        );
        // Changing data while live reroutes.
        m.table_write(16 + 8, &0x4042u32.to_le_bytes());
        assert_eq!(
            hooks.routes().last(),
            Some(&HookCall::SetMsiRoute {
                gsi,
                address: 0xfee0_1000,
                data: 0x4042,
                devid: 0,
                enabled: true
            })
        );
        // Reads return what was written; reserved control bits stay zero.
        let mut b = [0u8; 8];
        m.table_read(16, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0xfee0_1000);
        m.table_write(16 + 12, &0xffff_fffeu32.to_le_bytes());
        let mut c = [0u8; 4];
        m.table_read(16 + 12, &mut c);
        assert_eq!(u32::from_le_bytes(c), 0);
        // Masking removes the route.
        m.table_write(16 + 12, &1u32.to_le_bytes());
        assert!(matches!(
            hooks.routes().last(),
            Some(&HookCall::SetMsiRoute { enabled: false, .. })
        ));
    }

    #[test]
    fn masked_vector_pends_then_delivers() {
        let (hooks, mut m) = setup(2);
        let gsi = m.gsi(0).unwrap();
        m.set_message_control(MSG_CTL_ENABLE);
        program(&mut m, 0, 0xfee0_0000, 0x30);
        m.trigger(0);
        assert_eq!(hooks.irq_count(gsi), 1);
        // Vector mask.
        m.table_write(12, &1u32.to_le_bytes());
        m.trigger(0);
        assert_eq!(hooks.irq_count(gsi), 0);
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 1);
        m.table_write(12, &0u32.to_le_bytes());
        assert_eq!(hooks.irq_count(gsi), 1);
        assert!(!m.pending(0));
        // Function mask.
        m.set_message_control(MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK);
        m.trigger(0);
        assert!(m.pending(0));
        assert_eq!(hooks.irq_count(gsi), 0);
        m.set_message_control(MSG_CTL_ENABLE);
        assert_eq!(hooks.irq_count(gsi), 1);
        // Disabled: dropped; out of range: ignored.
        m.set_message_control(0);
        m.trigger(0);
        m.trigger(7);
        assert_eq!(hooks.irq_count(gsi), 0);
        assert!(!m.pending(0));
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (_hooks, mut m) = setup(1);
        let mut b = [0u8; 8];
        m.table_read(u64::MAX, &mut b);
        m.table_write(u64::MAX - 2, &[1, 2, 3, 4]);
        m.table_write(14, &[1, 2, 3, 4]);
        m.table_write(13, &[1, 2]);
        m.pba_read(u64::MAX - 1, &mut b);
        m.table_read(15, &mut b);
        assert_eq!(b, [0; 8]);
    }
}
