//! QEMU's device state: the sections after the RAM that this crate keeps as bytes.
//!
//! A QEMU source ends its stream with the RAM section's END, then one FULL section per
//! device (`timer`, `cpu`, `apic`, ..., `globalstate`), then EOF (0x00), then the VM
//! description (0x06, be32 length, JSON). A device section's length is known only to the
//! device's `VMStateDescription`, so a reader that does not model the device cannot step
//! over it. What it can do is read to the end of the stream and locate the end from
//! behind: the VM description's length field points back at the EOF byte
//! ([`find_vm_description`](crate::find_vm_description)). The bytes from the first device
//! section to that EOF byte are the device state, kept verbatim in
//! [`ForeignDeviceState::bytes`]: a relay forwards them unchanged, a destination reports
//! them.
//!
//! The sections inside are then split for reporting ([`ForeignDeviceState::sections`]):
//! each is `0x04 FULL, be32 section id, u8 len + id string, be32 instance id, be32
//! version id, data, 0x7e FOOTER, be32 section id`. The data is opaque, so the end of a
//! section is a footer with its own id that is followed by the next section's header or by
//! the EOF byte. With a VM description, the next header must also name the next device the
//! description lists (`devices[i].name`, `devices[i].instance_id`, in stream order), which
//! makes a false footer inside the data practically impossible. Without one (a QEMU started
//! with `suppress-vmdesc`), any plausible header is accepted, and the split must run
//! cleanly from the first section to the last byte before EOF, or the stream is refused
//! as truncated: the EOF byte alone is too weak a sign that the stream is complete.

use crate::decoder::SectionKind;
use crate::error::{Error, FormatError};
use crate::format::{SECTION_EOF, SECTION_FOOTER, SECTION_FULL, SECTION_START};

/// One QEMU device section inside [`ForeignDeviceState::bytes`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignSectionInfo {
    /// Stream offset of its header (the `0x04` byte).
    pub offset: u64,
    /// Bytes from its header to the end of its footer.
    pub len: u64,
    /// Section id.
    pub section_id: u32,
    /// Id string, e.g. `timer`, `0000:00:01.1/ide`.
    pub name: String,
    /// Instance id.
    pub instance_id: u32,
    /// Version id of the device's state.
    pub version_id: u32,
}

/// QEMU's device state at the end of a stream, kept as bytes: what a reader that does not
/// model QEMU's devices keeps of them, located from the end of the stream and split into
/// sections along the VM description ([`split_device_state`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignDeviceState {
    /// Stream offset of the first device section's header.
    pub offset: u64,
    /// The stream's bytes from that header up to the EOF byte (excluded): every device
    /// section, verbatim.
    pub bytes: Vec<u8>,
    /// The sections, in stream order, when the bytes could be split (always with a VM
    /// description that lists them, as QEMU writes); empty when they could not.
    pub sections: Vec<ForeignSectionInfo>,
    /// Stream offset of the EOF byte.
    pub eof_offset: u64,
}

impl ForeignDeviceState {
    /// The bytes of section `i` of [`sections`](Self::sections), header to footer.
    pub fn section_bytes(&self, i: usize) -> Option<&[u8]> {
        let s = self.sections.get(i)?;
        let start = usize::try_from(s.offset - self.offset).ok()?;
        self.bytes.get(start..start + usize::try_from(s.len).ok()?)
    }
}

/// The header bytes of a START or FULL section, as the stream has them (the reverse of
/// the decoder's header parser; used to put back a header the decoder consumed).
pub(crate) fn section_header_bytes(
    kind: SectionKind,
    section_id: u32,
    name: &str,
    instance_id: u32,
    version_id: u32,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(14 + name.len());
    out.push(match kind {
        SectionKind::Full => SECTION_FULL,
        _ => SECTION_START,
    });
    out.extend_from_slice(&section_id.to_be_bytes());
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&instance_id.to_be_bytes());
    out.extend_from_slice(&version_id.to_be_bytes());
    out
}

/// Splits `tail`, the stream from the first foreign section's header (at stream `offset`)
/// to the end of input, into QEMU's device state, the EOF byte and the VM description.
///
/// Returns the device state and the VM description JSON (None when the stream has none).
///
/// # Errors
/// [`FormatError::Truncated`] (`"device state (no EOF marker)"`) at the end of `tail` when
/// the stream does not end with EOF and a VM description whose length reaches exactly to
/// the end, or, without a VM description, with an EOF byte right after a run of complete
/// device sections.
pub fn split_device_state(
    offset: u64,
    tail: &[u8],
) -> Result<(ForeignDeviceState, Option<&[u8]>), Error> {
    let truncated = || Error::Format {
        offset: offset + tail.len() as u64,
        kind: FormatError::Truncated {
            what: "device state (no EOF marker)",
        },
    };
    let (eof_at, vmdesc) = match crate::io::find_vm_description(tail) {
        Some((eof_at, json)) => (eof_at, Some(json)),
        None if tail.last() == Some(&SECTION_EOF) => (tail.len() - 1, None),
        None => {
            return Err(match cut_vm_description(tail) {
                // EOF and the start of a VM description are there, its end is not.
                Some(_) => Error::Format {
                    offset: offset + tail.len() as u64,
                    kind: FormatError::Truncated {
                        what: "VM description",
                    },
                },
                None => truncated(),
            });
        }
    };
    let body = &tail[..eof_at];
    let expected = vmdesc.and_then(devices_listed);
    let sections = expected
        .as_deref()
        .and_then(|devs| split_sections(offset, body, Some(devs)))
        .or_else(|| split_sections(offset, body, None));
    let sections = match (sections, vmdesc) {
        (Some(s), _) => s,
        (None, Some(_)) => Vec::new(),
        (None, None) => return Err(truncated()),
    };
    Ok((
        ForeignDeviceState {
            offset,
            bytes: body.to_vec(),
            sections,
            eof_offset: offset + eof_at as u64,
        },
        vmdesc,
    ))
}

/// The offset of an EOF byte followed by the start of a VM description (0x06, a be32
/// length reaching past the end of `tail`, then `{`): the sign of a stream cut inside it.
fn cut_vm_description(tail: &[u8]) -> Option<usize> {
    (0..tail.len().saturating_sub(6)).rev().find(|&p| {
        let h = &tail[p..p + 6];
        let len = u32::from_be_bytes([h[2], h[3], h[4], h[5]]) as usize;
        h[0] == SECTION_EOF
            && h[1] == crate::format::VM_DESCRIPTION
            && p + 6 + len > tail.len()
            && tail.get(p + 6) == Some(&b'{')
    })
}

/// `(name, instance_id)` of every device the VM description lists, in order.
fn devices_listed(json: &[u8]) -> Option<Vec<(String, u32)>> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    v.get("devices")?
        .as_array()?
        .iter()
        .map(|d| {
            let name = d.get("name")?.as_str()?.to_owned();
            let inst = u32::try_from(d.get("instance_id")?.as_u64()?).ok()?;
            Some((name, inst))
        })
        .collect()
}

/// A FULL section header at `at` in `b`: `(section id, name, instance id, version id,
/// header length)`.
fn header_at(b: &[u8], at: usize) -> Option<(u32, &str, u32, u32, usize)> {
    let h = b.get(at..)?;
    if *h.first()? != SECTION_FULL {
        return None;
    }
    let be32 =
        |p: usize| -> Option<u32> { Some(u32::from_be_bytes(h.get(p..p + 4)?.try_into().ok()?)) };
    let id = be32(1)?;
    let len = *h.get(5)? as usize;
    let name = std::str::from_utf8(h.get(6..6 + len)?).ok()?;
    if name.is_empty() || !name.bytes().all(|c| c.is_ascii_graphic()) {
        return None;
    }
    let instance = be32(6 + len)?;
    let version = be32(10 + len)?;
    Some((id, name, instance, version, 14 + len))
}

/// Splits `body` (device sections only, EOF excluded) into sections; `expected` is the
/// VM description's device list that each header must match in order. None when the
/// sections do not run cleanly to the end of `body`.
fn split_sections(
    offset: u64,
    body: &[u8],
    expected: Option<&[(String, u32)]>,
) -> Option<Vec<ForeignSectionInfo>> {
    let matches = |at: usize, i: usize| -> bool {
        match header_at(body, at) {
            None => false,
            Some((_, name, inst, _, _)) => match expected {
                None => true,
                Some(devs) => devs.get(i).is_some_and(|(n, d)| n == name && *d == inst),
            },
        }
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let i = out.len();
        if !matches(at, i) {
            return None;
        }
        let (id, name, instance_id, version_id, hlen) = header_at(body, at)?;
        let mut footer = [SECTION_FOOTER, 0, 0, 0, 0];
        footer[1..].copy_from_slice(&id.to_be_bytes());
        // The first footer of this section's id after which the next section (or the end)
        // starts.
        let end = (at + hlen..=body.len().saturating_sub(5)).find_map(|r| {
            (body[r..r + 5] == footer && (r + 5 == body.len() || matches(r + 5, i + 1)))
                .then_some(r + 5)
        })?;
        out.push(ForeignSectionInfo {
            offset: offset + at as u64,
            len: (end - at) as u64,
            section_id: id,
            name: name.to_owned(),
            instance_id,
            version_id,
        });
        at = end;
    }
    if let Some(devs) = expected
        && devs.len() != out.len()
    {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(id: u32, name: &str, inst: u32, data: &[u8]) -> Vec<u8> {
        let mut s = section_header_bytes(SectionKind::Full, id, name, inst, 1);
        s.extend_from_slice(data);
        s.push(SECTION_FOOTER);
        s.extend_from_slice(&id.to_be_bytes());
        s
    }

    fn vmdesc(names: &[(&str, u32)]) -> Vec<u8> {
        let devices: Vec<_> = names
            .iter()
            .map(|(n, i)| serde_json::json!({"name": n, "instance_id": i}))
            .collect();
        let json = serde_json::to_vec(&serde_json::json!({"page_size": 4096, "devices": devices}))
            .unwrap();
        let mut out = vec![SECTION_EOF, crate::format::VM_DESCRIPTION];
        out.extend_from_slice(&(json.len() as u32).to_be_bytes());
        out.extend_from_slice(&json);
        out
    }

    #[test]
    fn splits_along_the_vm_description_even_with_false_footers_in_the_data() {
        // Section 3's data holds a footer of its own id followed by a plausible header of
        // another device: only the VM description's order tells it apart.
        let mut fake = vec![SECTION_FOOTER, 0, 0, 0, 3];
        fake.extend(section_header_bytes(SectionKind::Full, 9, "bogus", 0, 1));
        let a = section(3, "timer", 0, &fake);
        let b = section(4, "cpu", 0, &[1, 2, 3]);
        let c = section(5, "cpu", 1, &[]);
        let mut tail = [a.clone(), b.clone(), c.clone()].concat();
        tail.extend(vmdesc(&[("timer", 0), ("cpu", 0), ("cpu", 1)]));
        let (d, json) = split_device_state(1000, &tail).unwrap();
        assert!(json.is_some());
        assert_eq!(d.bytes.len(), a.len() + b.len() + c.len());
        assert_eq!(d.eof_offset, 1000 + d.bytes.len() as u64);
        let names: Vec<_> = d
            .sections
            .iter()
            .map(|s| (s.name.as_str(), s.instance_id))
            .collect();
        assert_eq!(names, [("timer", 0), ("cpu", 0), ("cpu", 1)]);
        assert_eq!(d.section_bytes(0), Some(&a[..]));
        assert_eq!(d.section_bytes(1), Some(&b[..]));
        assert_eq!(d.sections[1].offset, 1000 + a.len() as u64);
    }

    #[test]
    fn without_a_vm_description_the_sections_must_run_to_the_eof_byte() {
        let mut tail = [section(1, "timer", 0, &[0; 8]), section(2, "apic", 0, &[7])].concat();
        tail.push(SECTION_EOF);
        let (d, json) = split_device_state(0, &tail).unwrap();
        assert!(json.is_none());
        assert_eq!(d.sections.len(), 2);
        // Cut inside the second section's data, at a 0x00 byte: refused, not mistaken for EOF.
        let cut = [
            section(1, "timer", 0, &[0; 8]),
            section(2, "apic", 0, &[0; 8]),
        ]
        .concat();
        let cut = &cut[..cut.len() - 7];
        assert_eq!(*cut.last().unwrap(), 0);
        let e = split_device_state(500, cut).unwrap_err();
        assert_eq!(e.offset(), 500 + cut.len() as u64);
        assert!(matches!(
            e,
            Error::Format {
                kind: FormatError::Truncated { .. },
                ..
            }
        ));
    }

    #[test]
    fn a_stream_cut_inside_the_vm_description_is_truncated_there() {
        let mut tail = section(1, "timer", 0, &[1]);
        let body = tail.len();
        tail.extend(vmdesc(&[("timer", 0)]));
        for cut in [tail.len() - 1, tail.len() - 20, body + 7] {
            let e = split_device_state(100, &tail[..cut]).unwrap_err();
            assert_eq!(e.offset(), 100 + cut as u64);
            assert!(
                matches!(
                    e,
                    Error::Format {
                        kind: FormatError::Truncated {
                            what: "VM description"
                        },
                        ..
                    }
                ),
                "cut at {cut}: {e}"
            );
        }
        // Cut before the VM description's JSON starts: the device state has no end.
        let e = split_device_state(0, &tail[..body + 3]).unwrap_err();
        assert!(e.to_string().contains("device state"), "{e}");
        assert!(split_device_state(0, &[]).is_err());
    }

    #[test]
    fn device_state_the_description_does_not_match_is_kept_unsplit() {
        let mut tail = section(1, "timer", 0, &[1]);
        tail.extend(vmdesc(&[("something-else", 0)]));
        // The generic split still finds the one section.
        let (d, _) = split_device_state(0, &tail).unwrap();
        assert_eq!(d.sections.len(), 1);
        // Bytes that are not sections at all: kept, not split, not an error.
        let mut tail = vec![0x55; 40];
        tail.extend(vmdesc(&[("timer", 0)]));
        let (d, _) = split_device_state(0, &tail).unwrap();
        assert_eq!(d.bytes, vec![0x55; 40]);
        assert!(d.sections.is_empty());
    }
}
