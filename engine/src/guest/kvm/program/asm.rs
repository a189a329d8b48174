//! The guest program's code, assembled at run time with iced-x86's code assembler (what
//! one round does is in the [parent module's docs](super)).

use iced_x86::code_asm::*;

use super::super::KvmError;
use super::{CODE_BASE, PACING_PORT, mailbox};

/// Assembles the program for address [`CODE_BASE`] (see the module docs).
pub fn assemble() -> Result<Vec<u8>, KvmError> {
    build().map_err(KvmError::Assemble)
}

fn mb(off: u64) -> AsmMemoryOperand {
    dword_ptr(ebx + off as i32)
}

/// xorshift32 step on `[ebx+RNG]`; leaves the new value in EAX. Clobbers EDX.
fn rng_step(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(eax, mb(mailbox::RNG))?;
    a.mov(edx, eax)?;
    a.shl(edx, 13)?;
    a.xor(eax, edx)?;
    a.mov(edx, eax)?;
    a.shr(edx, 17)?;
    a.xor(eax, edx)?;
    a.mov(edx, eax)?;
    a.shl(edx, 5)?;
    a.xor(eax, edx)?;
    a.mov(mb(mailbox::RNG), eax)?;
    Ok(())
}

/// EDI = address of page number `(EAX × PAGES) >> 32`; keeps EAX in ESI.
fn random_page(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(esi, eax)?;
    a.mul(mb(mailbox::PAGES))?;
    a.mov(edi, edx)?;
    a.shl(edi, 12)?;
    a.add(edi, ebp)?;
    Ok(())
}

fn build() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let mut round = a.create_label();
    let mut sweep = a.create_label();
    let mut nowrap = a.create_label();
    let mut skip_c = a.create_label();
    let mut zero_page = a.create_label();
    let mut rewrite = a.create_label();
    let mut vloop = a.create_label();
    let mut vok = a.create_label();
    let mut vnowrap = a.create_label();
    let mut noscan = a.create_label();
    let mut sloop = a.create_label();
    let mut sok = a.create_label();

    a.cld()?;
    a.mov(ebp, mb(mailbox::BASE))?;
    a.set_label(&mut round)?;

    // 1. Counter sweep.
    a.mov(ecx, mb(mailbox::SWEEP_PAGES))?;
    a.mov(eax, mb(mailbox::SWEEP))?;
    a.set_label(&mut sweep)?;
    a.mov(edi, eax)?;
    a.shl(edi, 12)?;
    a.add(edi, ebp)?;
    a.inc(dword_ptr(edi))?;
    a.dec(dword_ptr(edi + 4092))?;
    a.inc(mb(mailbox::TOTAL))?;
    a.add(eax, mb(mailbox::STRIDE))?;
    a.cmp(eax, mb(mailbox::SWEEP_LIMIT))?;
    a.jb(nowrap)?;
    a.sub(eax, mb(mailbox::SWEEP_LIMIT))?;
    a.set_label(&mut nowrap)?;
    a.dec(ecx)?;
    a.jnz(sweep)?;
    a.mov(mb(mailbox::SWEEP), eax)?;

    // 2. Cache-line rewrite of a random page, line 1..=32.
    rng_step(&mut a)?;
    random_page(&mut a)?;
    a.mov(eax, esi)?;
    a.shr(eax, 8)?;
    a.and(eax, 31)?;
    a.inc(eax)?;
    a.shl(eax, 6)?;
    a.lea(ecx, dword_ptr(edi + eax))?;
    a.xor(edx, edx)?;
    for k in 0..16i32 {
        a.sub(edx, dword_ptr(ecx + 4 * k))?;
        a.mov(dword_ptr(ecx + 4 * k), esi)?;
        a.add(edx, esi)?;
        a.inc(esi)?;
    }
    a.sub(dword_ptr(edi + 4092), edx)?;

    // 3. Every 16th round: whole-page rewrite or zeroing, alternating.
    a.test(mb(mailbox::PROGRESS), 15)?;
    a.jnz(skip_c)?;
    rng_step(&mut a)?;
    random_page(&mut a)?;
    a.mov(edx, dword_ptr(edi))?;
    a.sub(mb(mailbox::TOTAL), edx)?;
    a.test(mb(mailbox::PROGRESS), 16)?;
    a.jnz(zero_page)?;
    // Rewrite: words 0..1022 = v, v + c, v + 2c, ...; word 1023 balances.
    a.mov(eax, esi)?;
    a.add(mb(mailbox::TOTAL), eax)?;
    a.xor(edx, edx)?;
    a.mov(ecx, 33)?;
    a.set_label(&mut rewrite)?;
    for k in 0..31i32 {
        a.mov(dword_ptr(edi + 4 * k), eax)?;
        a.add(edx, eax)?;
        a.add(eax, 0x0100_0193)?;
    }
    a.add(edi, 124)?;
    a.dec(ecx)?;
    a.jnz(rewrite)?;
    a.neg(edx)?;
    a.mov(dword_ptr(edi), edx)?;
    a.jmp(skip_c)?;
    a.set_label(&mut zero_page)?;
    a.xor(eax, eax)?;
    a.mov(ecx, 1024)?;
    a.rep().stosd()?;
    a.set_label(&mut skip_c)?;

    // 4. Verify one page.
    a.mov(eax, mb(mailbox::VERIFY))?;
    a.mov(edi, eax)?;
    a.shl(edi, 12)?;
    a.add(edi, ebp)?;
    a.inc(eax)?;
    a.cmp(eax, mb(mailbox::PAGES))?;
    a.jb(vnowrap)?;
    a.xor(eax, eax)?;
    a.set_label(&mut vnowrap)?;
    a.mov(mb(mailbox::VERIFY), eax)?;
    a.xor(edx, edx)?;
    a.mov(ecx, 64)?;
    a.set_label(&mut vloop)?;
    for k in 0..16i32 {
        a.add(edx, dword_ptr(edi + 4 * k))?;
    }
    a.add(edi, 64)?;
    a.dec(ecx)?;
    a.jnz(vloop)?;
    a.test(edx, edx)?;
    a.jz(vok)?;
    a.mov(mb(mailbox::FAIL), 1)?;
    a.sub(edi, 4096)?;
    a.mov(mb(mailbox::FAILED_ADDR), edi)?;
    a.mov(mb(mailbox::FAIL_VALUE), edx)?;
    a.set_label(&mut vok)?;

    // 5. Full scan every SCAN_INTERVAL rounds.
    a.mov(eax, mb(mailbox::SCAN_INTERVAL))?;
    a.test(eax, eax)?;
    a.jz(noscan)?;
    a.dec(mb(mailbox::SCAN_COUNTDOWN))?;
    a.jnz(noscan)?;
    a.mov(mb(mailbox::SCAN_COUNTDOWN), eax)?;
    a.mov(ecx, mb(mailbox::PAGES))?;
    a.mov(edi, ebp)?;
    a.xor(edx, edx)?;
    a.set_label(&mut sloop)?;
    a.add(edx, dword_ptr(edi))?;
    a.add(edi, 4096)?;
    a.dec(ecx)?;
    a.jnz(sloop)?;
    a.cmp(edx, mb(mailbox::TOTAL))?;
    a.je(sok)?;
    a.mov(mb(mailbox::FAIL), 2)?;
    a.mov(mb(mailbox::FAIL_VALUE), edx)?;
    a.jmp(noscan)?;
    a.set_label(&mut sok)?;
    a.inc(mb(mailbox::SCANS))?;
    a.set_label(&mut noscan)?;

    // 6. Progress, then hand the round's page count to the host.
    a.inc(mb(mailbox::PROGRESS))?;
    a.mov(eax, mb(mailbox::SWEEP_PAGES))?;
    a.add(eax, 2)?;
    a.out(i32::from(PACING_PORT), eax)?;
    a.jmp(round)?;

    a.assemble(CODE_BASE)
}
