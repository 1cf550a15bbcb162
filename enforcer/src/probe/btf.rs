//! The few facts about the running kernel's layout that the steal programs
//! need, read from its BTF (`/sys/kernel/btf/vmlinux`) at load time.
//!
//! Rust eBPF has no CO-RE field relocations: an offset compiled into the
//! object would be right for one kernel build only. So the programs take the
//! offsets of the `task_struct` fields they read as globals, and this module
//! finds them in the kernel's own type information. It parses just enough of
//! the BTF format (types and strings; see the kernel's `Documentation/bpf/btf.rst`)
//! and nothing else.

use std::path::Path;

/// Where the kernel's BTF lives.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("kernel BTF has no {0}")]
    NotFound(String),
}

/// Byte offsets in `task_struct` and the shape of `sched_switch` on this
/// kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLayout {
    /// `task_struct.pid` (the tid).
    pub pid: u32,
    /// `task_struct.tgid`.
    pub tgid: u32,
    /// The task's CPU: `task_struct.cpu` (before 5.16) or
    /// `task_struct.thread_info.cpu`.
    pub cpu: u32,
    /// `task_struct.__state` (5.14+) or `task_struct.state`.
    pub state: u32,
    /// Whether the `sched_switch` tracepoint passes `prev_state` (5.18+).
    pub switch_has_prev_state: bool,
    /// The way from a task to its run queue's clock; `None` when the BTF
    /// lacks a field of it (no `CONFIG_FAIR_GROUP_SCHED`).
    pub clock: Option<RqClockPath>,
}

/// `task->se.cfs_rq->rq->clock`, as three byte offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RqClockPath {
    /// `task_struct.se` + `sched_entity.cfs_rq`.
    pub task_cfs_rq: u32,
    /// `cfs_rq.rq`.
    pub cfs_rq_rq: u32,
    /// `rq.clock`.
    pub rq_clock: u32,
}

impl TaskLayout {
    /// Reads the layout of the running kernel.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_btf(&Btf::parse(&data)?)
    }

    pub fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        let task = btf.struct_by_name("task_struct")?;
        let cpu = match btf.member_offset(task, "cpu") {
            Ok(off) => off,
            Err(_) => {
                let thread_info = btf.member_offset(task, "thread_info")?;
                let ti = btf.struct_by_name("thread_info")?;
                thread_info + btf.member_offset(ti, "cpu")?
            }
        };
        let state = btf
            .member_offset(task, "__state")
            .or_else(|_| btf.member_offset(task, "state"))?;
        // typedef btf_trace_sched_switch → pointer → func proto
        // (void *__data, preempt, prev, next[, prev_state]).
        let params = btf.typedef_proto_params("btf_trace_sched_switch")?;
        let clock = (|| {
            let se = btf.member_offset(task, "se").ok()?;
            let entity = btf.struct_by_name("sched_entity").ok()?;
            let cfs_rq = btf.struct_by_name("cfs_rq").ok()?;
            let rq = btf.struct_by_name("rq").ok()?;
            Some(RqClockPath {
                task_cfs_rq: se + btf.member_offset(entity, "cfs_rq").ok()?,
                cfs_rq_rq: btf.member_offset(cfs_rq, "rq").ok()?,
                rq_clock: btf.member_offset(rq, "clock").ok()?,
            })
        })();
        Ok(Self {
            clock,
            pid: btf.member_offset(task, "pid")?,
            tgid: btf.member_offset(task, "tgid")?,
            cpu,
            state,
            switch_has_prev_state: params >= 5,
        })
    }
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

/// One parsed type: its header and, for structs and unions, its members
/// (name offset, type id, bit offset).
#[derive(Debug, Clone)]
struct Type {
    name_off: u32,
    kind: u32,
    vlen: u32,
    /// `size` or `type`, by kind.
    size_or_type: u32,
    members: Vec<(u32, u32, u32)>,
}

/// A parsed BTF blob (types and strings only).
#[derive(Debug)]
pub struct Btf {
    /// Index 0 is the implicit `void`.
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(data: &[u8], off: usize) -> Result<u32, BtfError> {
    data.get(off..off + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| BtfError::Malformed(format!("truncated at byte {off}")))
}

impl Btf {
    /// Parses a little-endian BTF blob.
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| BtfError::Malformed("empty".into()))?;
        if magic != 0xeb9f {
            return Err(BtfError::Malformed(format!(
                "magic {magic:#x}, expected 0xeb9f (little endian)"
            )));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or_else(|| BtfError::Malformed("string section out of bounds".into()))?
            .to_vec();
        if types_end > data.len() {
            return Err(BtfError::Malformed("type section out of bounds".into()));
        }
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            vlen: 0,
            size_or_type: 0,
            members: Vec::new(),
        }];
        let mut off = types_start;
        while off < types_end {
            let name_off = u32_at(data, off)?;
            let info = u32_at(data, off + 4)?;
            let size_or_type = u32_at(data, off + 8)?;
            off += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen as usize {
                        let m = off + i * 12;
                        let raw = u32_at(data, m + 8)?;
                        // With kind_flag, the top 8 bits are a bitfield size.
                        let bits = if kind_flag { raw & 0x00ff_ffff } else { raw };
                        members.push((u32_at(data, m)?, u32_at(data, m + 4)?, bits));
                    }
                    12 * vlen as usize
                }
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen as usize,
                KIND_DATASEC | KIND_ENUM64 => 12 * vlen as usize,
                _ => 0,
            };
            off += extra;
            types.push(Type {
                name_off,
                kind,
                vlen,
                size_or_type,
                members,
            });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    fn find(&self, name: &str, kind: u32) -> Result<usize, BtfError> {
        self.types
            .iter()
            .position(|t| t.kind == kind && self.name(t.name_off) == name.as_bytes())
            .ok_or_else(|| BtfError::NotFound(name.to_owned()))
    }

    /// The type id of the struct called `name`.
    pub fn struct_by_name(&self, name: &str) -> Result<usize, BtfError> {
        self.find(name, KIND_STRUCT)
    }

    /// Byte offset of member `name` in struct `id`, looking through
    /// anonymous struct and union members (as randomized layouts use).
    pub fn member_offset(&self, id: usize, name: &str) -> Result<u32, BtfError> {
        self.member_bits(id, name, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NotFound(format!("member {name} of type {id}")))
    }

    fn member_bits(&self, id: usize, name: &str, depth: u32) -> Option<u32> {
        let t = self.types.get(id)?;
        if depth > 8 {
            return None;
        }
        for &(name_off, _, bits) in &t.members {
            if self.name(name_off) == name.as_bytes() {
                return Some(bits);
            }
        }
        for &(name_off, type_id, bits) in &t.members {
            let inner = self.types.get(type_id as usize)?;
            if name_off == 0
                && matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Some(inner_bits) = self.member_bits(type_id as usize, name, depth + 1)
            {
                return Some(bits + inner_bits);
            }
        }
        None
    }

    /// Number of parameters of the function prototype a typedef points to
    /// (`typedef void (*name)(...)`).
    pub fn typedef_proto_params(&self, name: &str) -> Result<u32, BtfError> {
        let typedef = &self.types[self.find(name, KIND_TYPEDEF)?];
        let mut t = self.types.get(typedef.size_or_type as usize);
        for _ in 0..4 {
            match t {
                Some(ty) if ty.kind == KIND_FUNC_PROTO => return Ok(ty.vlen),
                Some(ty) if ty.kind == KIND_PTR || ty.kind == KIND_TYPEDEF => {
                    t = self.types.get(ty.size_or_type as usize);
                }
                _ => break,
            }
        }
        Err(BtfError::NotFound(format!("function prototype of {name}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob from (name, info, size_or_type, extra words) types.
    fn blob(strings: &[&str], types: &[(u32, u32, u32, Vec<u32>)]) -> Vec<u8> {
        let mut strtab = vec![0u8];
        for s in strings {
            strtab.extend_from_slice(s.as_bytes());
            strtab.push(0);
        }
        let mut tsec = Vec::new();
        for (name, info, size, extra) in types {
            for w in [*name, *info, *size].iter().chain(extra) {
                tsec.extend_from_slice(&w.to_le_bytes());
            }
        }
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9fu16.to_le_bytes());
        out.push(1);
        out.push(0);
        for w in [
            24u32,
            0,
            tsec.len() as u32,
            tsec.len() as u32,
            strtab.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&tsec);
        out.extend_from_slice(&strtab);
        out
    }

    fn off(strings: &[&str], s: &str) -> u32 {
        let mut o = 1;
        for x in strings {
            if *x == s {
                return o;
            }
            o += x.len() as u32 + 1;
        }
        panic!("{s}")
    }

    fn layout(new_kernel: bool) -> TaskLayout {
        let names = [
            "int",
            "task_struct",
            "thread_info",
            "pid",
            "tgid",
            "cpu",
            "__state",
            "state",
            "btf_trace_sched_switch",
            "flags",
        ];
        let n = |s| off(&names, s);
        let member = |name: u32, ty: u32, bits: u32| vec![name, ty, bits];
        let mut types = vec![
            // 1: int
            (n("int"), KIND_INT << 24, 4, vec![32]),
        ];
        let (task_members, ti): (Vec<Vec<u32>>, _) = if new_kernel {
            // thread_info { flags, cpu } at 0; anonymous struct holding
            // __state at byte 24; pid at 1000, tgid at 1004.
            (
                vec![
                    member(n("thread_info"), 3, 0),
                    member(0, 4, 24 * 8),
                    member(n("pid"), 1, 1000 * 8),
                    member(n("tgid"), 1, 1004 * 8),
                ],
                true,
            )
        } else {
            (
                vec![
                    member(n("state"), 1, 16 * 8),
                    member(n("cpu"), 1, 68 * 8),
                    member(n("pid"), 1, 900 * 8),
                    member(n("tgid"), 1, 904 * 8),
                ],
                false,
            )
        };
        // 2: task_struct
        types.push((
            n("task_struct"),
            (KIND_STRUCT << 24) | task_members.len() as u32,
            2000,
            task_members.concat(),
        ));
        // 3: thread_info { flags @0, cpu @8 }
        types.push((
            n("thread_info"),
            (KIND_STRUCT << 24) | 2,
            24,
            [member(n("flags"), 1, 0), member(n("cpu"), 1, 64)].concat(),
        ));
        // 4: anonymous struct { __state @0 }
        types.push((0, (KIND_STRUCT << 24) | 1, 8, member(n("__state"), 1, 0)));
        // 5: func proto with 4 or 5 params; 6: ptr → 5; 7: typedef → 6
        let params = if ti { 5 } else { 4 };
        types.push((
            0,
            (KIND_FUNC_PROTO << 24) | params,
            0,
            [0, 1].repeat(params as usize),
        ));
        types.push((0, KIND_PTR << 24, 5, vec![]));
        types.push((n("btf_trace_sched_switch"), KIND_TYPEDEF << 24, 6, vec![]));
        let data = blob(&names, &types);
        TaskLayout::from_btf(&Btf::parse(&data).expect("parses")).expect("layout")
    }

    #[test]
    fn finds_task_fields_on_a_modern_layout_through_thread_info_and_anonymous_structs() {
        assert_eq!(
            layout(true),
            TaskLayout {
                pid: 1000,
                tgid: 1004,
                cpu: 8,
                state: 24,
                switch_has_prev_state: true,
                clock: None,
            }
        );
    }

    #[test]
    fn finds_task_fields_on_a_5_10_layout() {
        assert_eq!(
            layout(false),
            TaskLayout {
                pid: 900,
                tgid: 904,
                cpu: 68,
                state: 16,
                switch_has_prev_state: false,
                clock: None,
            }
        );
    }

    #[test]
    fn rejects_a_blob_that_is_not_btf() {
        assert!(matches!(
            Btf::parse(b"\x7fELF...."),
            Err(BtfError::Malformed(_))
        ));
    }

    /// On a host with BTF, the running kernel's layout is found (the values
    /// themselves differ per build; pid and tgid are adjacent ints).
    #[test]
    fn reads_the_running_kernels_layout_when_it_has_btf() {
        if !Path::new(VMLINUX_BTF).exists() {
            eprintln!("no {VMLINUX_BTF}: skipped");
            return;
        }
        let layout = TaskLayout::from_sys_fs().expect("layout of the running kernel");
        assert_eq!(layout.tgid, layout.pid + 4);
    }
}
