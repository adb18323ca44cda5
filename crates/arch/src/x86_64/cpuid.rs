//! CPUID for each vCPU: KVM's supported table plus topology, hypervisor leaves and hidden features.
//!
//! [`build_cpuid`] is a pure function over the entry list so it can be tested without KVM;
//! [`setup_cpuid`] fetches KVM's table, applies it and installs the result on a vCPU.

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

use super::{check_vcpu_count, Error};

/// A CPUID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One feature bit: leaf, subleaf, register, bit.
#[derive(Clone, Copy, Debug)]
struct Bit(u32, u32, Reg, u8);

/// A named feature that can be hidden, with the bits it clears and the features it implies.
struct Feature {
    name: &'static str,
    bits: &'static [Bit],
    /// XSAVE state components (XCR0 bits) that go away with the feature.
    xcr0: u64,
    /// Other features hidden along with this one.
    implies: &'static [&'static str],
}

use Reg::{Eax, Ebx, Ecx, Edx};

/// A feature with no XSAVE state and no implied features.
const fn simple(name: &'static str, bits: &'static [Bit]) -> Feature {
    Feature {
        name,
        bits,
        xcr0: 0,
        implies: &[],
    }
}

const FEATURES: &[Feature] = &[
    Feature {
        name: "xsave",
        // XSAVE, OSXSAVE; leaf 0xD is cleared separately.
        bits: &[
            Bit(1, 0, Ecx, 26),
            Bit(1, 0, Ecx, 27),
            // AMX-BF16, AMX-TILE, AMX-INT8 need XSAVE state.
            Bit(7, 0, Edx, 22),
            Bit(7, 0, Edx, 24),
            Bit(7, 0, Edx, 25),
        ],
        xcr0: !0,
        implies: &["avx", "avx2", "avx512", "pku"],
    },
    Feature {
        name: "avx",
        // AVX, FMA, F16C; VAES, VPCLMULQDQ.
        bits: &[
            Bit(1, 0, Ecx, 28),
            Bit(1, 0, Ecx, 12),
            Bit(1, 0, Ecx, 29),
            Bit(7, 0, Ecx, 9),
            Bit(7, 0, Ecx, 10),
        ],
        xcr0: 1 << 2,
        implies: &["avx2", "avx512"],
    },
    Feature {
        name: "avx2",
        // AVX2; AVX-VNNI, AVX-IFMA, AVX-VNNI-INT8, AVX-NE-CONVERT, AVX-VNNI-INT16.
        bits: &[
            Bit(7, 0, Ebx, 5),
            Bit(7, 1, Eax, 4),
            Bit(7, 1, Eax, 23),
            Bit(7, 1, Edx, 4),
            Bit(7, 1, Edx, 5),
            Bit(7, 1, Edx, 10),
        ],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "avx512",
        bits: &[
            // F, DQ, IFMA, PF, ER, CD, BW, VL
            Bit(7, 0, Ebx, 16),
            Bit(7, 0, Ebx, 17),
            Bit(7, 0, Ebx, 21),
            Bit(7, 0, Ebx, 26),
            Bit(7, 0, Ebx, 27),
            Bit(7, 0, Ebx, 28),
            Bit(7, 0, Ebx, 30),
            Bit(7, 0, Ebx, 31),
            // VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ
            Bit(7, 0, Ecx, 1),
            Bit(7, 0, Ecx, 6),
            Bit(7, 0, Ecx, 11),
            Bit(7, 0, Ecx, 12),
            Bit(7, 0, Ecx, 14),
            // 4VNNIW, 4FMAPS, VP2INTERSECT, FP16
            Bit(7, 0, Edx, 2),
            Bit(7, 0, Edx, 3),
            Bit(7, 0, Edx, 8),
            Bit(7, 0, Edx, 23),
            // BF16, AVX10
            Bit(7, 1, Eax, 5),
            Bit(7, 1, Edx, 19),
        ],
        xcr0: 0b111 << 5,
        implies: &[],
    },
    simple("pcid", &[Bit(1, 0, Ecx, 17)]),
    simple("cx16", &[Bit(1, 0, Ecx, 13)]),
    simple("x2apic", &[Bit(1, 0, Ecx, 21)]),
    simple("rdrand", &[Bit(1, 0, Ecx, 30)]),
    simple("rdseed", &[Bit(7, 0, Ebx, 18)]),
    simple("tsc-deadline", &[Bit(1, 0, Ecx, 24)]),
    simple("pdpe1gb", &[Bit(0x8000_0001, 0, Edx, 26)]),
    simple("fsgsbase", &[Bit(7, 0, Ebx, 0)]),
    simple("smep", &[Bit(7, 0, Ebx, 7)]),
    simple("smap", &[Bit(7, 0, Ebx, 20)]),
    simple("umip", &[Bit(7, 0, Ecx, 2)]),
    Feature {
        name: "pku",
        // PKU, OSPKE
        bits: &[Bit(7, 0, Ecx, 3), Bit(7, 0, Ecx, 4)],
        xcr0: 1 << 9,
        implies: &[],
    },
    simple("la57", &[Bit(7, 0, Ecx, 16)]),
    simple("invpcid", &[Bit(7, 0, Ebx, 10)]),
    simple("hle", &[Bit(7, 0, Ebx, 4)]),
    simple("rtm", &[Bit(7, 0, Ebx, 11)]),
    simple("rdtscp", &[Bit(0x8000_0001, 0, Edx, 27)]),
    simple("rdpid", &[Bit(7, 0, Ecx, 22)]),
];

const FEATURE_NAMES: &[&str] = &[
    "xsave",
    "avx",
    "avx2",
    "avx512",
    "pcid",
    "cx16",
    "x2apic",
    "rdrand",
    "rdseed",
    "tsc-deadline",
    "pdpe1gb",
    "fsgsbase",
    "smep",
    "smap",
    "umip",
    "pku",
    "la57",
    "invpcid",
    "hle",
    "rtm",
    "rdtscp",
    "rdpid",
];

/// Names accepted by [`setup_cpuid`]'s `hide` list.
pub fn cpuid_feature_names() -> &'static [&'static str] {
    FEATURE_NAMES
}

/// Checks a list of CPU features to hide (the `cpuid_hide` option) without touching KVM:
/// every name must be one of [`cpuid_feature_names`].
pub fn validate_cpuid_hide(names: &[String]) -> Result<(), Error> {
    HiddenFeatures::parse(names).map(|_| ())
}

/// A set of features to hide, with implications expanded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HiddenFeatures {
    /// Bit i set: `FEATURES[i]` is hidden.
    mask: u64,
}

fn feature_index(name: &str) -> Option<usize> {
    FEATURES.iter().position(|f| f.name == name)
}

impl HiddenFeatures {
    /// Parses feature names (case-insensitive, `_` accepted for `-`); unknown names are an error.
    pub fn parse(names: &[String]) -> Result<Self, Error> {
        let mut hidden = HiddenFeatures::default();
        for raw in names {
            let name = raw.trim().to_ascii_lowercase().replace('_', "-");
            if name.is_empty() {
                continue;
            }
            let Some(index) = feature_index(&name) else {
                return Err(Error::UnknownCpuFeature {
                    name: raw.clone(),
                    known: FEATURE_NAMES.join(", "),
                });
            };
            hidden.add(index);
        }
        Ok(hidden)
    }

    fn add(&mut self, index: usize) {
        if self.mask & (1 << index) != 0 {
            return;
        }
        self.mask |= 1 << index;
        if let Some(feature) = FEATURES.get(index) {
            for implied in feature.implies {
                if let Some(i) = feature_index(implied) {
                    self.add(i);
                }
            }
        }
    }

    /// True if the named feature is hidden.
    pub fn contains(&self, name: &str) -> bool {
        feature_index(name).is_some_and(|i| self.mask & (1 << i) != 0)
    }

    fn features(&self) -> impl Iterator<Item = &'static Feature> + '_ {
        FEATURES
            .iter()
            .enumerate()
            .filter(|(i, _)| self.mask & (1 << i) != 0)
            .map(|(_, f)| f)
    }

    /// XSAVE state components to remove from leaf 0xD.
    fn xcr0_mask(&self) -> u64 {
        self.features().fold(0, |m, f| m | f.xcr0)
    }
}

/// What [`build_cpuid`] needs besides KVM's table.
#[derive(Clone, Debug)]
pub struct CpuidConfig {
    /// APIC id (= vCPU index) of this vCPU.
    pub apic_id: u8,
    /// Total number of vCPUs (all cores of one package, one thread each).
    pub nr_vcpus: u8,
    /// KVM can emulate the TSC-deadline timer.
    pub tsc_deadline: bool,
    /// Features to hide.
    pub hidden: HiddenFeatures,
}

/// Leaf 1 ECX: TSC-deadline timer.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: OSXSAVE (KVM tracks CR4.OSXSAVE itself).
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Hypervisor base leaf.
const HYPERVISOR_LEAF: u32 = 0x4000_0000;
/// KVM paravirtual features leaf.
const KVM_FEATURES_LEAF: u32 = 0x4000_0001;
/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Eax => &mut e.eax,
        Ebx => &mut e.ebx,
        Ecx => &mut e.ecx,
        Edx => &mut e.edx,
    }
}

/// Bits needed to number `count` items (ceil(log2(count))).
fn id_bits(count: u8) -> u32 {
    u32::from(count).next_power_of_two().trailing_zeros()
}

fn entry(function: u32, index: u32, flags: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        padding: [0; 3],
    }
}

/// Replaces an extended topology leaf (0xB or 0x1F): one thread per core, `nr` cores.
fn topology_leaf(function: u32, cfg: &CpuidConfig) -> Vec<kvm_cpuid_entry2> {
    let id = u32::from(cfg.apic_id);
    let f = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
    vec![
        // SMT level: shift 0, one logical processor.
        entry(function, 0, f, [0, 1, 1 << 8, id]),
        // Core level: shift covers all cores.
        entry(
            function,
            1,
            f,
            [
                id_bits(cfg.nr_vcpus),
                u32::from(cfg.nr_vcpus),
                1 | (2 << 8),
                id,
            ],
        ),
        // Terminator.
        entry(function, 2, f, [0, 0, 2, id]),
    ]
}

/// Removes the state components in `remove` from leaf 0xD and fixes its size fields.
fn mask_xsave_leaf(entries: &mut [kvm_cpuid_entry2], remove: u64) {
    for e in entries.iter_mut().filter(|e| e.function == 0xd) {
        if e.index == 0 {
            e.eax &= !((remove & 0xffff_ffff) as u32);
            e.edx &= !((remove >> 32) as u32);
        } else if e.index == 1 {
            // XSS-managed components live in ECX/EDX of subleaf 1.
            e.ecx &= !((remove & 0xffff_ffff) as u32);
            e.edx &= !((remove >> 32) as u32);
        } else if e.index < 64 && remove & (1u64 << e.index) != 0 {
            *e = entry(0xd, e.index, e.flags, [0; 4]);
        }
    }
    let Some(xcr0) = entries
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map(|e| u64::from(e.eax) | (u64::from(e.edx) << 32))
    else {
        return;
    };
    // Legacy area (512 bytes) plus XSAVE header (64 bytes) at least.
    let max_size = entries
        .iter()
        .filter(|e| e.function == 0xd && (2..64).contains(&e.index))
        .filter(|e| xcr0 & (1u64 << e.index) != 0)
        .map(|e| e.ebx.saturating_add(e.eax))
        .fold(576, u32::max);
    if let Some(e) = entries
        .iter_mut()
        .find(|e| e.function == 0xd && e.index == 0)
    {
        e.ecx = max_size;
    }
}

/// Turns KVM's supported CPUID into the table vCPU `cfg.apic_id` sees.
pub fn build_cpuid(entries: &mut Vec<kvm_cpuid_entry2>, cfg: &CpuidConfig) {
    let nr = u32::from(cfg.nr_vcpus);
    let id = u32::from(cfg.apic_id);
    let core_bits = id_bits(cfg.nr_vcpus);
    let max_basic = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);

    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // Addressable logical processor ids in the package (8 bits).
                let ids = (1u32 << core_bits).min(0xff);
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (ids << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                e.ecx &= !LEAF1_ECX_OSXSAVE;
                if cfg.tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !LEAF1_ECX_TSC_DEADLINE;
                }
                if nr > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            // Deterministic cache parameters (Intel): cores per package, threads per cache.
            4 if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { nr } else { 1 };
                let cores = (nr - 1).min(0x3f);
                e.eax = (e.eax & 0x3fff) | (cores << 26) | ((sharing - 1) << 14);
            }
            // AMD cache topology: threads sharing each cache.
            0x8000_001d if e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { nr } else { 1 };
                e.eax = (e.eax & !(0xfff << 14)) | ((sharing - 1) << 14);
            }
            // AMD: number of cores and APIC id size.
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (nr - 1);
            }
            // AMD extended APIC id, core id, one thread per core, node 0.
            0x8000_001e => {
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }

    // Extended topology leaves.
    for leaf in [0xbu32, 0x1f] {
        let present = entries.iter().any(|e| e.function == leaf);
        entries.retain(|e| e.function != leaf);
        if present && max_basic >= leaf {
            entries.extend(topology_leaf(leaf, cfg));
        }
    }

    // Hypervisor leaves with the KVM signature.
    if !entries.iter().any(|e| e.function == KVM_FEATURES_LEAF) {
        entries.push(entry(KVM_FEATURES_LEAF, 0, 0, [0; 4]));
    }
    let signature = [
        KVM_FEATURES_LEAF,
        KVM_SIGNATURE[0],
        KVM_SIGNATURE[1],
        KVM_SIGNATURE[2],
    ];
    match entries.iter_mut().find(|e| e.function == HYPERVISOR_LEAF) {
        Some(e) => {
            e.eax = e.eax.max(KVM_FEATURES_LEAF);
            e.ebx = signature[1];
            e.ecx = signature[2];
            e.edx = signature[3];
        }
        None => entries.push(entry(HYPERVISOR_LEAF, 0, 0, signature)),
    }

    // Hidden features.
    for feature in cfg.hidden.features() {
        for &Bit(leaf, subleaf, reg, bit) in feature.bits {
            for e in entries
                .iter_mut()
                .filter(|e| e.function == leaf && e.index == subleaf)
            {
                *reg_mut(e, reg) &= !(1u32 << bit);
            }
        }
    }
    if cfg.hidden.contains("xsave") {
        for e in entries.iter_mut().filter(|e| e.function == 0xd) {
            *e = entry(0xd, e.index, e.flags, [0; 4]);
        }
    } else {
        let remove = cfg.hidden.xcr0_mask();
        if remove != 0 {
            mask_xsave_leaf(entries, remove);
        }
    }
}

/// Sets the CPUID of vCPU `id` (of `nr_vcpus`) from what KVM supports, hiding `hide`.
pub fn setup_cpuid(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    id: u8,
    nr_vcpus: u8,
    hide: &[String],
) -> Result<(), Error> {
    check_vcpu_count(nr_vcpus)?;
    if id >= nr_vcpus {
        return Err(Error::InvalidVcpuId {
            id,
            count: nr_vcpus,
        });
    }
    let hidden = HiddenFeatures::parse(hide)?;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| Error::Kvm {
            what: "KVM_GET_SUPPORTED_CPUID",
            source,
        })?;
    let mut entries = supported.as_slice().to_vec();
    let cfg = CpuidConfig {
        apic_id: id,
        nr_vcpus,
        tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
        hidden,
    };
    build_cpuid(&mut entries, &cfg);
    let cpuid = CpuId::from_entries(&entries)
        .map_err(|e| Error::Cpuid(format!("{} entries: {e:?}", entries.len())))?;
    vcpu.set_cpuid2(&cpuid).map_err(|source| Error::Kvm {
        what: "KVM_SET_CPUID2",
        source,
    })
}

#[cfg(test)]
// Test inputs are small constants and indices; their casts cannot truncate.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("no leaf {function:#x}.{index}"))
    }

    /// A small table shaped like KVM's: everything set so clearing is visible.
    fn sample() -> Vec<kvm_cpuid_entry2> {
        let f = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        vec![
            entry(0, 0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(1, 0, 0, [0x806f8, 0x0008_0800, 0x7ffa_3203, 0x178b_fbff]),
            entry(4, 0, f, [0x121, 0x01c0_003f, 0x3f, 0]),
            entry(4, 1, f, [0x143, 0x01c0_003f, 0x3ff, 0]),
            entry(4, 2, f, [0x163, 0x03c0_003f, 0x3fff, 0]),
            entry(7, 0, f, [1, !0, !0, !0]),
            entry(7, 1, f, [!0, 0, 0, !0]),
            entry(0xb, 0, f, [1, 2, 0x100, 7]),
            entry(0xb, 1, f, [4, 16, 0x201, 7]),
            // XCR0 = x87 | SSE | AVX | opmask | ZMM_Hi256 | Hi16_ZMM | PKRU
            entry(0xd, 0, f, [0x2e7, 0x340, 0xa88, 0]),
            entry(0xd, 1, f, [0xf, 0x340, 0, 0]),
            entry(0xd, 2, f, [0x100, 0x240, 0, 0]),
            entry(0xd, 5, f, [0x40, 0x340, 0, 0]),
            entry(0xd, 6, f, [0x200, 0x380, 0, 0]),
            entry(0xd, 7, f, [0x400, 0x580, 0, 0]),
            entry(0xd, 9, f, [0x8, 0xa80, 0, 0]),
            entry(0x1f, 0, f, [1, 2, 0x100, 7]),
            entry(0x4000_0000, 0, 0, [0x4000_0001, 0, 0, 0]),
            entry(0x8000_0001, 0, 0, [0, 0, !0, !0]),
            entry(0x8000_0008, 0, 0, [0x3030, 0, 0x7007, 0]),
            entry(0x8000_001e, 0, 0, [5, 0x105, 0x3, 0]),
        ]
    }

    fn build(
        apic_id: u8,
        nr_vcpus: u8,
        hide: &[&str],
        tsc_deadline: bool,
    ) -> Vec<kvm_cpuid_entry2> {
        let mut entries = sample();
        let cfg = CpuidConfig {
            apic_id,
            nr_vcpus,
            tsc_deadline,
            hidden: HiddenFeatures::parse(&names(hide)).unwrap(),
        };
        build_cpuid(&mut entries, &cfg);
        entries
    }

    #[test]
    fn names_match_table() {
        let table: Vec<&str> = FEATURES.iter().map(|f| f.name).collect();
        assert_eq!(table, cpuid_feature_names());
        for f in FEATURES {
            for implied in f.implies {
                assert!(feature_index(implied).is_some(), "{implied}");
            }
        }
    }

    #[test]
    fn parse_names() {
        let h = HiddenFeatures::parse(&names(&["PCID", " tsc_deadline", ""])).unwrap();
        assert!(h.contains("pcid"));
        assert!(h.contains("tsc-deadline"));
        assert!(!h.contains("avx"));
        let err = HiddenFeatures::parse(&names(&["avx", "sse9"])).unwrap_err();
        match &err {
            Error::UnknownCpuFeature { name, known } => {
                assert_eq!(name, "sse9");
                assert!(known.contains("xsave") && known.contains("invpcid"));
            }
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("sse9"));
    }

    #[test]
    fn implications() {
        let h = HiddenFeatures::parse(&names(&["xsave"])).unwrap();
        for name in ["xsave", "avx", "avx2", "avx512", "pku"] {
            assert!(h.contains(name), "{name}");
        }
        assert!(!h.contains("pcid"));
        let h = HiddenFeatures::parse(&names(&["avx"])).unwrap();
        assert!(h.contains("avx2") && h.contains("avx512") && !h.contains("xsave"));
        let h = HiddenFeatures::parse(&names(&["avx512"])).unwrap();
        assert!(!h.contains("avx") && !h.contains("avx2"));
    }

    #[test]
    fn topology_and_signature() {
        let e = build(2, 4, &[], true);
        let leaf1 = find(&e, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 2, "APIC id");
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!(leaf1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(leaf1.ecx & LEAF1_ECX_OSXSAVE, 0);
        assert_ne!(leaf1.edx & LEAF1_EDX_HTT, 0);

        // Leaf 4: 4 cores per package; L1/L2 private, L3 shared by all.
        assert_eq!(find(&e, 4, 0).eax >> 26, 3);
        assert_eq!((find(&e, 4, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&e, 4, 2).eax >> 14) & 0xfff, 3);
        assert_eq!(find(&e, 4, 2).eax & 0x3fff, 0x163);

        // Leaf 0xB / 0x1F.
        for leaf in [0xb, 0x1f] {
            let smt = find(&e, leaf, 0);
            let core = find(&e, leaf, 1);
            let end = find(&e, leaf, 2);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 2));
            assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
            assert_eq!(e.iter().filter(|x| x.function == leaf).count(), 3);
        }

        // AMD leaves.
        assert_eq!(find(&e, 0x8000_0008, 0).ecx & 0xf0ff, 0x2003);
        assert_eq!(find(&e, 0x8000_001e, 0).eax, 2);

        // KVM signature.
        let hv = find(&e, 0x4000_0000, 0);
        let mut sig = Vec::new();
        for r in [hv.ebx, hv.ecx, hv.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
        assert!(hv.eax >= 0x4000_0001);
        assert!(e.iter().any(|x| x.function == 0x4000_0001));
    }

    #[test]
    fn many_vcpus_saturate_narrow_fields() {
        let e = build(253, 254, &[], true);
        let leaf1 = find(&e, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 253);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 0xff);
        assert_eq!(find(&e, 4, 0).eax >> 26, 0x3f);
        assert_eq!((find(&e, 4, 2).eax >> 14) & 0xfff, 253);
        assert_eq!(find(&e, 0xb, 1).eax, 8);
        assert_eq!(find(&e, 0xb, 1).ebx, 254);
    }

    #[test]
    fn single_vcpu_and_no_tsc_deadline() {
        let e = build(0, 1, &[], false);
        let leaf1 = find(&e, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 0);
        assert_eq!(leaf1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(leaf1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(find(&e, 0xb, 1).eax, 0);
        assert_eq!(find(&e, 0xb, 1).ebx, 1);
    }

    #[test]
    fn adds_hypervisor_leaves_when_missing() {
        let mut entries: Vec<_> = sample()
            .into_iter()
            .filter(|e| e.function & 0x4000_0000 == 0)
            .collect();
        let cfg = CpuidConfig {
            apic_id: 0,
            nr_vcpus: 1,
            tsc_deadline: false,
            hidden: HiddenFeatures::default(),
        };
        build_cpuid(&mut entries, &cfg);
        assert_eq!(find(&entries, 0x4000_0000, 0).ebx, KVM_SIGNATURE[0]);
    }

    #[test]
    fn validation_accepts_known_names_and_lists_them_for_an_unknown_one() {
        assert!(validate_cpuid_hide(&names(&["AVX512", "pku", " "])).is_ok());
        let e = validate_cpuid_hide(&names(&["avx", "warp-drive"])).unwrap_err();
        assert!(
            matches!(&e, Error::UnknownCpuFeature { name, .. } if name == "warp-drive"),
            "{e}"
        );
        assert!(e.to_string().contains("avx512"), "{e}");
    }

    #[test]
    fn hides_simple_features() {
        let e = build(
            0,
            2,
            &["pcid", "x2apic", "rdrand", "tsc-deadline", "cx16"],
            true,
        );
        let ecx = find(&e, 1, 0).ecx;
        for bit in [17, 21, 30, 24, 13] {
            assert_eq!(ecx & (1 << bit), 0, "bit {bit}");
        }
        // Unrelated bits stay.
        assert_ne!(ecx & (1 << 0), 0, "SSE3");
        let e = build(
            0,
            2,
            &[
                "fsgsbase", "smep", "smap", "invpcid", "rdseed", "umip", "la57",
            ],
            true,
        );
        let l7 = find(&e, 7, 0);
        for bit in [0, 7, 20, 10, 18] {
            assert_eq!(l7.ebx & (1 << bit), 0, "ebx bit {bit}");
        }
        for bit in [2, 16] {
            assert_eq!(l7.ecx & (1 << bit), 0, "ecx bit {bit}");
        }
        assert_ne!(l7.ebx & (1 << 5), 0, "AVX2 stays");
        let e = build(0, 2, &["pdpe1gb"], true);
        assert_eq!(find(&e, 0x8000_0001, 0).edx & (1 << 26), 0);
        assert_ne!(find(&e, 0x8000_0001, 0).edx & (1 << 27), 0, "RDTSCP stays");
    }

    #[test]
    fn hides_avx512_and_its_state() {
        let e = build(0, 1, &["avx512"], true);
        let l7 = find(&e, 7, 0);
        for bit in [16, 17, 21, 26, 27, 28, 30, 31] {
            assert_eq!(l7.ebx & (1 << bit), 0, "ebx bit {bit}");
        }
        assert_ne!(l7.ebx & (1 << 5), 0, "AVX2 stays");
        assert_eq!(find(&e, 7, 1).eax & (1 << 5), 0, "AVX512_BF16");
        let xd = find(&e, 0xd, 0);
        assert_eq!(xd.eax, 0x207, "opmask/ZMM state removed");
        // Largest remaining component: PKRU at 0xa80 + 8.
        assert_eq!(xd.ecx, 0xa88);
        assert_eq!(find(&e, 0xd, 6).eax, 0);
        assert_eq!(find(&e, 0xd, 2).eax, 0x100, "AVX state stays");
    }

    #[test]
    fn hides_avx_family() {
        let e = build(0, 1, &["avx"], true);
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ecx & (1 << 28), 0, "AVX");
        assert_eq!(l1.ecx & (1 << 12), 0, "FMA");
        assert_ne!(l1.ecx & (1 << 26), 0, "XSAVE stays");
        assert_eq!(find(&e, 7, 0).ebx & (1 << 5), 0, "AVX2");
        assert_eq!(find(&e, 7, 0).ebx & (1 << 16), 0, "AVX512F");
        let xd = find(&e, 0xd, 0);
        assert_eq!(xd.eax, 0x203, "x87, SSE, PKRU");
        assert_eq!(xd.ecx, 0xa88);
        let e = build(0, 1, &["avx", "pku"], true);
        assert_eq!(find(&e, 0xd, 0).eax, 0x3);
        assert_eq!(find(&e, 0xd, 0).ecx, 576);
        assert_eq!(find(&e, 7, 0).ecx & (3 << 3), 0, "PKU, OSPKE");
    }

    #[test]
    fn hides_xsave_and_leaf_d() {
        let e = build(0, 1, &["xsave"], true);
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ecx & (1 << 26), 0, "XSAVE");
        assert_eq!(l1.ecx & (1 << 28), 0, "AVX");
        assert_eq!(find(&e, 7, 0).ebx & (1 << 5), 0, "AVX2");
        assert_eq!(find(&e, 7, 0).ebx & (1 << 31), 0, "AVX512VL");
        for x in e.iter().filter(|x| x.function == 0xd) {
            assert_eq!(
                (x.eax, x.ebx, x.ecx, x.edx),
                (0, 0, 0, 0),
                "0xd.{}",
                x.index
            );
        }
    }

    /// kvm_pvm rewrites a vCPU's CPUID after KVM_SET_CPUID2 with what the hardware reports,
    /// so bits hidden here (and bits KVM says it does not support) come back.
    fn kvm_rewrites_cpuid() -> bool {
        std::path::Path::new("/sys/module/kvm_pvm").exists()
    }

    #[test]
    fn kvm_setup_cpuid() {
        let Some((kvm, _vm, vcpus)) = crate::regs::tests::kvm_vm(2) else {
            return;
        };
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let supported_leaf1 = find(supported.as_slice(), 1, 0);
        for (id, vcpu) in vcpus.iter().enumerate() {
            setup_cpuid(&kvm, vcpu, id as u8, 2, &names(&["avx512", "cx16"])).unwrap();
            let got = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
            let got = got.as_slice();
            let leaf1 = find(got, 1, 0);
            assert_eq!(leaf1.ebx >> 24, id as u32, "APIC id");
            assert_eq!((leaf1.ebx >> 16) & 0xff, 2, "logical processors");
            assert_ne!(leaf1.ecx & LEAF1_ECX_HYPERVISOR, 0);
            let hv = find(got, 0x4000_0000, 0);
            assert_eq!([hv.ebx, hv.ecx, hv.edx], KVM_SIGNATURE);
            let topo = find(got, 0xb, 1);
            assert_eq!((topo.ebx, topo.edx), (2, id as u32));
            if kvm_rewrites_cpuid() {
                eprintln!("SKIP hidden-bit check: kvm_pvm rewrites the vCPU CPUID");
            } else if supported_leaf1.ecx & (1 << 13) != 0 {
                assert_eq!(leaf1.ecx & (1 << 13), 0, "CX16 hidden");
                if let Some(l7) = got.iter().find(|e| e.function == 7 && e.index == 0) {
                    assert_eq!(l7.ebx & (1 << 16), 0, "AVX512F hidden");
                }
            }
        }
        let err = setup_cpuid(&kvm, &vcpus[0], 0, 2, &names(&["bogus"])).unwrap_err();
        assert!(matches!(err, Error::UnknownCpuFeature { .. }));
        let err = setup_cpuid(&kvm, &vcpus[0], 2, 2, &[]).unwrap_err();
        assert!(matches!(err, Error::InvalidVcpuId { id: 2, count: 2 }));
    }
}
