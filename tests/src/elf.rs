//! Tiny hand-made PVH kernels: an ELF64 with one loadable segment of raw 32-bit code at
//! 1 MiB and a `Xen` PHYS32_ENTRY note pointing at it. Used to test how the VMM handles guest
//! exits (debug-exit values, power-off, triple faults) without the probe guest.

/// Where the code is loaded and entered.
pub const LOAD_ADDR: u64 = 0x10_0000;

const CODE_OFFSET: usize = 0x1000;

fn push_u16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn push_u32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn push_u64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

/// An ELF64 x86_64 executable whose PVH entry runs `code` (32-bit protected mode, paging off).
pub fn pvh_kernel(code: &[u8]) -> Vec<u8> {
    const EHDR: u16 = 64;
    const PHDR: u16 = 56;
    let note_offset = usize::from(EHDR) + 2 * usize::from(PHDR);
    let mut note = Vec::new();
    push_u32(&mut note, 4); // namesz: "Xen\0"
    push_u32(&mut note, 4); // descsz: a 32-bit entry address
    push_u32(&mut note, 18); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    push_u32(
        &mut note,
        u32::try_from(LOAD_ADDR).expect("the PVH entry is a 32-bit address"),
    );

    let mut f = Vec::with_capacity(CODE_OFFSET + code.len());
    // ELF header.
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    push_u16(&mut f, 2); // ET_EXEC
    push_u16(&mut f, 0x3e); // EM_X86_64
    push_u32(&mut f, 1); // EV_CURRENT
    push_u64(&mut f, LOAD_ADDR); // e_entry
    push_u64(&mut f, u64::from(EHDR)); // e_phoff
    push_u64(&mut f, 0); // e_shoff
    push_u32(&mut f, 0); // e_flags
    push_u16(&mut f, EHDR);
    push_u16(&mut f, PHDR);
    push_u16(&mut f, 2); // e_phnum
    push_u16(&mut f, 64); // e_shentsize
    push_u16(&mut f, 0); // e_shnum
    push_u16(&mut f, 0); // e_shstrndx
                         // PT_LOAD, R+X.
    push_u32(&mut f, 1);
    push_u32(&mut f, 5);
    push_u64(&mut f, CODE_OFFSET as u64);
    push_u64(&mut f, LOAD_ADDR);
    push_u64(&mut f, LOAD_ADDR);
    push_u64(&mut f, code.len() as u64);
    push_u64(&mut f, code.len() as u64);
    push_u64(&mut f, 0x1000);
    // PT_NOTE.
    push_u32(&mut f, 4);
    push_u32(&mut f, 4);
    push_u64(&mut f, note_offset as u64);
    push_u64(&mut f, 0);
    push_u64(&mut f, 0);
    push_u64(&mut f, note.len() as u64);
    push_u64(&mut f, note.len() as u64);
    push_u64(&mut f, 4);
    f.extend_from_slice(&note);
    f.resize(CODE_OFFSET, 0);
    f.extend_from_slice(code);
    f
}

/// `out 0xF4, eax` with `eax = value`, then halt forever.
pub fn debug_exit_code(value: u32) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf4, 0x00]; // mov dx, 0xf4
    c.push(0xb8); // mov eax, imm32
    c.extend_from_slice(&value.to_le_bytes());
    c.push(0xef); // out dx, eax
    c.extend_from_slice(&HALT_LOOP);
    c
}

/// `outw(0x604, 0x2000)`: ACPI S5 through PM1a_CNT, then halt forever.
pub fn acpi_poweroff_code() -> Vec<u8> {
    let mut c = vec![
        0x66, 0xba, 0x04, 0x06, // mov dx, 0x604
        0x66, 0xb8, 0x00, 0x20, // mov ax, 0x2000
        0x66, 0xef, // out dx, ax
    ];
    c.extend_from_slice(&HALT_LOOP);
    c
}

/// `ud2` with no IDT: #UD, then #DF, then a triple fault.
pub fn triple_fault_code() -> Vec<u8> {
    let mut c = vec![0x0f, 0x0b];
    c.extend_from_slice(&HALT_LOOP);
    c
}

/// `cli; hlt; jmp $-1`: halt with interrupts off, forever.
const HALT_LOOP: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn header_and_segments_describe_the_code() {
        let code = debug_exit_code(42);
        let elf = pvh_kernel(&code);
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(u16_at(&elf, 18), 0x3e);
        assert_eq!(u64_at(&elf, 24), LOAD_ADDR);
        assert_eq!(u16_at(&elf, 56), 2);
        let load = 64;
        assert_eq!(u32_at(&elf, load), 1);
        let off = usize::try_from(u64_at(&elf, load + 8)).unwrap();
        let len = usize::try_from(u64_at(&elf, load + 32)).unwrap();
        assert_eq!(&elf[off..off + len], &code[..]);
        let note = 64 + 56;
        assert_eq!(u32_at(&elf, note), 4);
        let noff = usize::try_from(u64_at(&elf, note + 8)).unwrap();
        assert_eq!(u32_at(&elf, noff + 8), 18);
        assert_eq!(&elf[noff + 12..noff + 16], b"Xen\0");
        assert_eq!(u64::from(u32_at(&elf, noff + 16)), LOAD_ADDR);
    }

    #[test]
    fn debug_exit_code_loads_the_value() {
        let c = debug_exit_code(0x1234_5678);
        assert_eq!(&c[5..9], &0x1234_5678u32.to_le_bytes());
        assert_eq!(c[9], 0xef);
    }
}
