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
    Feature {
        name: "pcid",
        bits: &[Bit(1, 0, Ecx, 17)],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "cx16",
        bits: &[Bit(1, 0, Ecx, 13)],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "x2apic",
        bits: &[Bit(1, 0, Ecx, 21)],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "rdrand",
        bits: &[Bit(1, 0, Ecx, 30)],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "rdseed",
        bits: &[Bit(7, 0, Ebx, 18)],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "tsc-deadline",
        bits: &[Bit(1, 0, Ecx, 24)],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "pdpe1gb",
        bits: &[Bit(0x8000_0001, 0, Edx, 26)],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "fsgsbase",
        bits: &[Bit(7, 0, Ebx, 0)],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "smep",
        bits: &[Bit(7, 0, Ebx, 7)],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "smap",
        bits: &[Bit(7, 0, Ebx, 20)],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "umip",
        bits: &[Bit(7, 0, Ecx, 2)],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "pku",
        // PKU, OSPKE
        bits: &[Bit(7, 0, Ecx, 3), Bit(7, 0, Ecx, 4)],
        xcr0: 1 << 9,
        implies: &[],
    },
    Feature {
        name: "la57",
        bits: &[Bit(7, 0, Ecx, 16)],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "invpcid",
        bits: &[Bit(7, 0, Ebx, 10)],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "hle",
        bits: &[Bit(7, 0, Ebx, 4)],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "rtm",
        bits: &[Bit(7, 0, Ebx, 11)],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "rdtscp",
        bits: &[Bit(0x8000_0001, 0, Edx, 27)],
        xcr0: 0,
        implies: &[],
    },
    Feature {
        name: "rdpid",
        bits: &[Bit(7, 0, Ecx, 22)],
        xcr0: 0,
        implies: &[],
    },
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
            e.eax &= !(remove as u32);
            e.edx &= !((remove >> 32) as u32);
        } else if e.index == 1 {
            // XSS-managed components live in ECX/EDX of subleaf 1.
            e.ecx &= !(remove as u32);
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
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (((1u32 << core_bits) & 0xff) << 16);
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
                e.eax = (e.eax & 0x3fff) | (((nr - 1) & 0x3f) << 26) | ((sharing - 1) << 14);
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
