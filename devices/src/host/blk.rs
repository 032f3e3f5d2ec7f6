//! A raw disk image file as a `BlockBackend`.
//!
//! Writes go to the page cache with `pwrite`; a guest FLUSH becomes `fdatasync`, so a
//! write the guest saw acknowledged by a completed flush survives a host crash.
//! Discard punches a hole (`fallocate(PUNCH_HOLE | KEEP_SIZE)`) where the filesystem
//! supports it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::virtio::blk::{BackendError, BlockBackend};

pub struct FileDisk {
    file: File,
    len: u64,
    can_discard: bool,
}

impl FileDisk {
    /// Open `path` (read-only if asked). Errors name what went wrong; the caller adds the path.
    pub fn open(path: &Path, read_only: bool) -> io::Result<FileDisk> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() && !is_block_device(&meta) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        }
        let len = if meta.is_file() {
            meta.len()
        } else {
            block_device_len(&file)?
        };
        Ok(FileDisk {
            file,
            len,
            can_discard: !read_only && meta.is_file(),
        })
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

fn is_block_device(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    meta.file_type().is_block_device()
}

fn block_device_len(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

impl BlockBackend for FileDisk {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|_| BackendError::Io)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|_| BackendError::Io)
    }

    fn flush(&mut self) -> Result<(), BackendError> {
        self.file.sync_data().map_err(|_| BackendError::Io)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.punch_hole(offset, len)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) => BackendError::Unsupported,
                _ => BackendError::Io,
            })
    }

    fn can_discard(&self) -> bool {
        self.can_discard
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_writes_and_punches_holes_in_a_real_file() {
        let dir = std::env::temp_dir().join(format!("filedisk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        std::fs::write(&path, vec![0xaa; 8192]).unwrap();
        let mut d = FileDisk::open(&path, false).unwrap();
        assert_eq!(d.size(), 8192);
        d.write_at(512, &[1; 512]).unwrap();
        d.flush().unwrap();
        let mut b = [0; 512];
        d.read_at(512, &mut b).unwrap();
        assert_eq!(b, [1; 512]);
        assert!(d.read_at(8000, &mut b).is_err(), "past the end");
        match d.discard(4096, 4096) {
            Ok(()) => {
                d.read_at(4096, &mut b).unwrap();
                assert_eq!(b, [0; 512]);
            }
            Err(BackendError::Unsupported) => {} // e.g. a filesystem without holes
            Err(e) => panic!("{e:?}"),
        }
        let ro = FileDisk::open(&path, true).unwrap();
        assert!(!ro.can_discard());
        assert!(
            FileDisk::open(&dir, false).is_err(),
            "a directory is not a disk"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
