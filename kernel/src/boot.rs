//! PVH entry: from QEMU's 32-bit hand-over to Rust in long mode, and the `hvm_start_info`
//! the loader leaves behind.
//!
//! # How the guest starts
//! 1. QEMU's `-kernel` loader sees the ELF note of owner `"Xen"`, type 18
//!    (`XEN_ELFNOTE_PHYS32_ENTRY`), and loads the PT_LOAD segments at their physical addresses
//!    (the image is linked at 1 MiB, see `linker.ld`). SeaBIOS runs first: it enumerates PCI
//!    and assigns the BARs, then its PVH option ROM jumps to [`pvh_start32`] in 32-bit protected
//!    mode, paging off, with `ebx` = physical address of [`HvmStartInfo`].
//! 2. `pvh_start32` zeroes `.bss`, builds identity page tables for the first
//!    [`IDENTITY_MAP_LIMIT`] bytes (1 GiB pages when CPUID reports `pdpe1gb`, otherwise 2 MiB
//!    pages), enables PAE, SSE (`CR4.OSFXSR`, `CR4.OSXMMEXCPT`, `CR0.EM=0`, `CR0.MP=1`; no
//!    `OSXSAVE`), long mode (`EFER.LME`) and paging, loads a minimal 64-bit GDT and far-jumps to
//!    64-bit code.
//! 3. The 64-bit stub loads the data segments and the boot stack ([`BOOT_STACK_SIZE`]) and
//!    calls `kernel_main(start_info)` in `main.rs`, which loads the real GDT/TSS/IDT
//!    (`cpu.rs`), the clock, the heap and the rest.
//!
//! If the CPU has no long mode, the 32-bit code prints a line on COM1 and halts.
//!
//! # Memory layout
//! Physical == virtual everywhere (identity map), so a pointer is also a DMA address.
//! `0..1 MiB`: BIOS, the start info, the command line (copied out early, never used as heap);
//! `1 MiB..__kernel_end`: the image (text, rodata, data, then bss with page tables and stacks);
//! the rest of the RAM in the memory map: the heap.

use core::arch::global_asm;

/// Bytes identity-mapped by the boot page tables: enough for the RAM of any guest we run and for
/// the PCI MMIO windows (the 32-bit hole below 4 GiB and the 64-bit window SeaBIOS puts above RAM).
pub const IDENTITY_MAP_LIMIT: u64 = 64 << 30;

/// Size of the boot stack the kernel (and the main loop) runs on.
pub const BOOT_STACK_SIZE: usize = 1 << 20;

/// `hvm_start_info.magic`.
pub const HVM_START_MAGIC: u32 = 0x336e_c578;

/// The start-of-day information of the PVH boot protocol (`xen/include/public/arch-x86/hvm/
/// start_info.h`), version 1 (with the memory map).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HvmStartInfo {
    /// [`HVM_START_MAGIC`].
    pub magic: u32,
    /// 0, or 1 when the memory-map fields are valid.
    pub version: u32,
    /// `SIF_*` flags.
    pub flags: u32,
    /// Number of modules (initrds); unused here.
    pub nr_modules: u32,
    /// Physical address of the module list.
    pub modlist_paddr: u64,
    /// Physical address of the NUL-terminated command line, or 0.
    pub cmdline_paddr: u64,
    /// Physical address of the ACPI RSDP, or 0.
    pub rsdp_paddr: u64,
    /// Physical address of the memory map (version 1).
    pub memmap_paddr: u64,
    /// Number of memory-map entries (version 1).
    pub memmap_entries: u32,
    /// Reserved.
    pub reserved: u32,
}

/// One entry of the PVH memory map (E820 types).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct MemmapEntry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`MEMMAP_RAM`], [`MEMMAP_RESERVED`], ...
    pub kind: u32,
    /// Reserved.
    pub reserved: u32,
}

/// Memory-map type of usable RAM.
pub const MEMMAP_RAM: u32 = 1;
/// Memory-map type of reserved memory.
pub const MEMMAP_RESERVED: u32 = 2;

/// Human name of a memory-map type.
pub fn memmap_kind_name(kind: u32) -> &'static str {
    match kind {
        1 => "RAM",
        2 => "reserved",
        3 => "ACPI",
        4 => "ACPI NVS",
        5 => "unusable",
        7 => "persistent",
        _ => "other",
    }
}

/// Longest command line kept; longer ones are cut (and reported).
pub const MAX_CMDLINE: usize = 4096;
/// Most memory-map entries kept.
pub const MAX_MEMMAP: usize = 64;

/// What the kernel keeps from the start info. Copied out of low memory before the heap exists.
pub struct BootInfo {
    /// The command line bytes (`cmdline_len` of them are valid).
    pub cmdline: [u8; MAX_CMDLINE],
    /// Valid bytes in `cmdline`.
    pub cmdline_len: usize,
    /// The command line was longer than [`MAX_CMDLINE`].
    pub cmdline_truncated: bool,
    /// The memory map.
    pub memmap: [MemmapEntry; MAX_MEMMAP],
    /// Valid entries in `memmap`.
    pub memmap_len: usize,
    /// Physical address of the ACPI RSDP (0 if none).
    pub rsdp: u64,
}

impl BootInfo {
    /// The command line as text, or `None` if it is not UTF-8.
    pub fn cmdline(&self) -> Option<&str> {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).ok()
    }

    /// The memory-map entries.
    pub fn memmap(&self) -> &[MemmapEntry] {
        &self.memmap[..self.memmap_len]
    }
}

/// Why the start info cannot be used.
#[derive(Debug)]
pub enum BootInfoError {
    /// `magic` is not [`HVM_START_MAGIC`] (not booted through PVH).
    BadMagic(u32),
    /// Version 0: no memory map.
    NoMemoryMap,
}

/// Reads the start info at physical address `paddr` (from `ebx` at entry) into `out`.
///
/// # Safety
/// `paddr` must be the address the PVH loader passed in `ebx`, still intact (call this before
/// the heap is set up over low memory).
pub unsafe fn read_start_info(paddr: u64, out: &mut BootInfo) -> Result<(), BootInfoError> {
    // SAFETY: the loader put a `HvmStartInfo` at `paddr`, identity-mapped; read it unaligned in
    // case the loader did not align it.
    let info = unsafe { core::ptr::read_unaligned(paddr as *const HvmStartInfo) };
    if info.magic != HVM_START_MAGIC {
        return Err(BootInfoError::BadMagic(info.magic));
    }
    out.rsdp = info.rsdp_paddr;
    out.cmdline_len = 0;
    out.cmdline_truncated = false;
    if info.cmdline_paddr != 0 {
        let mut p = info.cmdline_paddr as *const u8;
        loop {
            // SAFETY: the command line is a NUL-terminated string at `cmdline_paddr`; we stop
            // at the NUL.
            let byte = unsafe { p.read() };
            if byte == 0 {
                break;
            }
            if out.cmdline_len == MAX_CMDLINE {
                out.cmdline_truncated = true;
                break;
            }
            out.cmdline[out.cmdline_len] = byte;
            out.cmdline_len += 1;
            p = p.wrapping_add(1);
        }
    }
    if info.version < 1 || info.memmap_paddr == 0 {
        return Err(BootInfoError::NoMemoryMap);
    }
    let count = (info.memmap_entries as usize).min(MAX_MEMMAP);
    for i in 0..count {
        let entry = (info.memmap_paddr as *const MemmapEntry).wrapping_add(i);
        // SAFETY: the loader wrote `memmap_entries` entries at `memmap_paddr`.
        out.memmap[i] = unsafe { core::ptr::read_unaligned(entry) };
    }
    out.memmap_len = count;
    Ok(())
}

// The PVH note: QEMU reads the descriptor as a native word at the note's name rounded up to the
// segment's alignment (4), so the descriptor is a full 8-byte address.
global_asm!(
    r#"
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4                 /* namesz: "Xen\0" */
    .long 8                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4
    .popsection
    "#,
    options(att_syntax)
);

// The 32-bit entry, the page tables, the boot GDT and the switch to long mode.
global_asm!(
    r#"
    .pushsection .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi                     /* keep the start info address */

    /* zero .bss (page tables and stacks live there) */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl

    /* long mode? (cpuid clobbers ebx, the start info is in esi) */
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb .Lno_long_mode
    movl $0x80000001, %eax
    cpuid
    btl $29, %edx
    jnc .Lno_long_mode

    /* PML4[0] -> PDPT */
    movl $boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, boot_pml4

    btl $26, %edx                       /* 1 GiB pages? */
    jnc .Lmap_2m

    /* PDPT[i] = i GiB | PS | RW | P */
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $30, %eax
    orl $0x83, %eax
    movl %ecx, %edx
    shrl $2, %edx
    movl %eax, boot_pdpt(,%ecx,8)
    movl %edx, boot_pdpt+4(,%ecx,8)
    incl %ecx
    cmpl ${gib}, %ecx
    jb 1b
    jmp .Lpaging

.Lmap_2m:
    /* PDPT[i] -> PD i; PD entries j = j * 2 MiB | PS | RW | P */
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $12, %eax
    addl $boot_pd, %eax
    orl $0x3, %eax
    movl %eax, boot_pdpt(,%ecx,8)
    incl %ecx
    cmpl ${gib}, %ecx
    jb 2b
    xorl %ecx, %ecx
3:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %ecx, %edx
    shrl $11, %edx
    movl %eax, boot_pd(,%ecx,8)
    movl %edx, boot_pd+4(,%ecx,8)
    incl %ecx
    cmpl ${gib} * 512, %ecx
    jb 3b

.Lpaging:
    /* CR4: PAE | OSFXSR | OSXMMEXCPT */
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    /* EFER.LME */
    movl $0xC0000080, %ecx
    rdmsr
    orl $(1 << 8), %eax
    wrmsr
    /* CR0: PG | WP | NE | MP | PE, EM off */
    movl %cr0, %eax
    andl $~(1 << 2), %eax
    orl $((1 << 31) | (1 << 16) | (1 << 5) | (1 << 1) | 1), %eax
    movl %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $.Llong_mode

.Lno_long_mode:
    movl $.Lno_lm_msg, %esi
4:  movb (%esi), %al
    testb %al, %al
    jz 5f
    movw $0x3f8, %dx
    outb %al, %dx
    incl %esi
    jmp 4b
5:  hlt
    jmp 5b

    .code64
.Llong_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    movl %esi, %edi                     /* kernel_main(start_info) */
    call kernel_main
6:  hlt
    jmp 6b
    .popsection

    .pushsection .rodata.boot, "a"
    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff            /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff            /* 0x10: data */
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt
.Lno_lm_msg:
    .asciz "qcow-metal: this CPU has no 64-bit long mode; halting\r\n"
    .popsection

    .pushsection .bss.boot, "aw", @nobits
    .balign 4096
    .global boot_pml4
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * {gib}
    .balign 4096
    .global boot_stack_guard
boot_stack_guard:                       /* unmapped by paging::unmap_page at boot */
    .skip 4096
    .global boot_stack_bottom
boot_stack_bottom:
    .skip {stack}
    .global boot_stack_top
boot_stack_top:
    .popsection
    "#,
    gib = const IDENTITY_MAP_LIMIT >> 30,
    stack = const BOOT_STACK_SIZE,
    options(att_syntax)
);

unsafe extern "C" {
    static boot_stack_guard: u8;
    static boot_stack_bottom: u8;
    static boot_stack_top: u8;
    static __kernel_start: u8;
    static __kernel_end: u8;
}

/// The physical range `[start, end)` of the loaded image, bss included.
pub fn kernel_image() -> (u64, u64) {
    // Linker-defined symbols: only their addresses are taken.
    (
        &raw const __kernel_start as u64,
        &raw const __kernel_end as u64,
    )
}

/// The 4 KiB guard page just below the boot stack.
pub fn stack_guard() -> u64 {
    &raw const boot_stack_guard as u64
}

/// The boot stack `[bottom, top)`.
pub fn boot_stack() -> (u64, u64) {
    // Symbols defined in the boot assembly: only their addresses are taken.
    (
        &raw const boot_stack_bottom as u64,
        &raw const boot_stack_top as u64,
    )
}
