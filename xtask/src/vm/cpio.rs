//! A reproducible initramfs: a newc ("070701") cpio archive, gzip-compressed.
//!
//! Written here rather than with `cpio(1)` so that the archive depends only on
//! its inputs: entries are sorted by path, every entry is owned by root with
//! mtime 0, inode numbers are assigned in order, and the gzip header carries
//! no name and mtime 0. The same inputs give the same bytes on any machine.

use std::{collections::BTreeMap, io::Write, path::Path};

use anyhow::{Context, Result, bail};
use flate2::{Compression, GzBuilder};

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File { data: Vec<u8>, executable: bool },
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
}

/// The contents of an initramfs, keyed by path relative to its root.
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Node>,
}

impl Archive {
    /// Adds `node` at `path` (leading `/` optional), creating missing parent
    /// directories. Adding a path twice is a bug in the caller.
    pub fn add(&mut self, path: &str, node: Node) -> Result<()> {
        let path = path.trim_start_matches('/').trim_end_matches('/');
        if path.is_empty()
            || path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            bail!("invalid initramfs path {path:?}");
        }
        let mut parent = String::new();
        for component in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |(_, p)| p)
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent.clone(), Node::Dir);
                }
                Some(Node::Dir) => {}
                Some(_) => bail!("{parent} is not a directory, cannot hold {path}"),
            }
        }
        match self.entries.get(path) {
            Some(Node::Dir) if node == Node::Dir => Ok(()),
            Some(_) => bail!("{path} added to the initramfs twice"),
            None => {
                self.entries.insert(path.to_owned(), node);
                Ok(())
            }
        }
    }

    /// Adds the file at `source` (read now) as `path`.
    pub fn add_file(&mut self, path: &str, source: &Path, executable: bool) -> Result<()> {
        let data =
            std::fs::read(source).with_context(|| format!("reading {}", source.display()))?;
        self.add(path, Node::File { data, executable })
    }

    /// The uncompressed newc archive.
    pub fn to_cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // BTreeMap iterates in path order, so a directory always precedes its
        // contents ("a" < "a/b"), as the kernel's unpacker needs.
        for (ino, (path, node)) in (1u32..).zip(&self.entries) {
            let (mode, nlink, rdev, data): (u32, u32, (u32, u32), &[u8]) = match node {
                Node::Dir => (0o040_755, 2, (0, 0), &[]),
                Node::File { data, executable } => (
                    if *executable { 0o100_755 } else { 0o100_644 },
                    1,
                    (0, 0),
                    data,
                ),
                Node::Symlink(target) => (0o120_777, 1, (0, 0), target.as_bytes()),
                Node::CharDevice { major, minor } => (0o020_600, 1, (*major, *minor), &[]),
            };
            write_entry(&mut out, ino, mode, nlink, rdev, path, data);
        }
        write_entry(&mut out, 0, 0, 1, (0, 0), "TRAILER!!!", &[]);
        out
    }

    /// Writes the gzip-compressed archive to `dest`.
    pub fn write_gz(&self, dest: &Path) -> Result<()> {
        let cpio = self.to_cpio();
        let file =
            std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
        // mtime 0 and no file name in the header: the output depends only on
        // the archive's contents.
        let mut gz = GzBuilder::new()
            .mtime(0)
            .write(std::io::BufWriter::new(file), Compression::fast());
        gz.write_all(&cpio)
            .and_then(|()| gz.finish()?.flush())
            .with_context(|| format!("writing {}", dest.display()))?;
        Ok(())
    }
}

fn write_entry(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) {
    let namesize = u32::try_from(name.len() + 1).expect("path length fits u32");
    let filesize = u32::try_from(data.len()).expect("initramfs file under 4 GiB");
    // c_ino c_mode c_uid c_gid c_nlink c_mtime c_filesize c_devmajor
    // c_devminor c_rdevmajor c_rdevminor c_namesize c_check
    let fields = [
        ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rdev.0, rdev.1, namesize, 0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Archive {
        let mut a = Archive::default();
        a.add(
            "/bin/busybox",
            Node::File {
                data: b"\x7fELF".to_vec(),
                executable: true,
            },
        )
        .unwrap();
        a.add("bin/sh", Node::Symlink("busybox".into())).unwrap();
        a.add("dev/console", Node::CharDevice { major: 5, minor: 1 })
            .unwrap();
        a.add(
            "init",
            Node::File {
                data: b"#!/bin/sh\n".to_vec(),
                executable: true,
            },
        )
        .unwrap();
        a
    }

    /// Parses a newc archive back into (name, mode, rdev, data) tuples.
    /// (name, mode, (rdevmajor, rdevminor), data)
    type Parsed = (String, u32, (u32, u32), Vec<u8>);

    fn parse(mut buf: &[u8]) -> Vec<Parsed> {
        let mut entries = Vec::new();
        let total = buf.len();
        loop {
            assert_eq!(
                &buf[..6],
                b"070701",
                "bad magic at offset {}",
                total - buf.len()
            );
            let field = |i: usize| {
                u32::from_str_radix(
                    std::str::from_utf8(&buf[6 + 8 * i..14 + 8 * i]).unwrap(),
                    16,
                )
                .unwrap()
            };
            let (mode, filesize, namesize) = (field(1), field(6) as usize, field(11) as usize);
            assert_eq!(
                (field(2), field(3), field(5)),
                (0, 0, 0),
                "uid, gid and mtime must be 0"
            );
            let rdev = (field(9), field(10));
            let name = std::str::from_utf8(&buf[110..110 + namesize - 1])
                .unwrap()
                .to_owned();
            let data_start = (110 + namesize).next_multiple_of(4);
            let data = buf[data_start..data_start + filesize].to_vec();
            buf = &buf[(data_start + filesize).next_multiple_of(4)..];
            if name == "TRAILER!!!" {
                assert!(buf.is_empty(), "bytes after the trailer");
                return entries;
            }
            entries.push((name, mode, rdev, data));
        }
    }

    #[test]
    fn cpio_lists_parents_first_sorted_with_modes_and_data() {
        let entries = parse(&sample().to_cpio());
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "init"]
        );
        assert_eq!(entries[0].1, 0o040_755);
        assert_eq!(
            (entries[1].1, entries[1].3.as_slice()),
            (0o100_755, &b"\x7fELF"[..])
        );
        assert_eq!(
            (entries[2].1, entries[2].3.as_slice()),
            (0o120_777, &b"busybox"[..])
        );
        assert_eq!((entries[4].1, entries[4].2), (0o020_600, (5, 1)));
    }

    #[test]
    fn same_contents_give_identical_gzip_bytes() {
        let dir = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.gz"), dir.join("b.gz"));
        sample().write_gz(&a).unwrap();
        // Same entries added in another order.
        let mut other = Archive::default();
        other
            .add(
                "init",
                Node::File {
                    data: b"#!/bin/sh\n".to_vec(),
                    executable: true,
                },
            )
            .unwrap();
        other
            .add("dev/console", Node::CharDevice { major: 5, minor: 1 })
            .unwrap();
        other
            .add("bin/sh", Node::Symlink("busybox".into()))
            .unwrap();
        other
            .add(
                "bin/busybox",
                Node::File {
                    data: b"\x7fELF".to_vec(),
                    executable: true,
                },
            )
            .unwrap();
        other.write_gz(&b).unwrap();
        let (a, b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(a, b);
        // gzip header: magic, deflate, no flags (no name), mtime 0.
        assert_eq!(&a[..8], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn adding_a_path_twice_or_under_a_file_is_rejected() {
        let mut a = sample();
        assert!(a.add("init", Node::Dir).is_err());
        assert!(a.add("init/x", Node::Dir).is_err());
        assert!(a.add("../etc", Node::Dir).is_err());
        a.add("bin", Node::Dir).unwrap();
    }
}
