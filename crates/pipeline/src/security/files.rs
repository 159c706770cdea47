//! Files that hold secrets: directories 0700, files 0600, written whole or not at all
//! (a temporary file in the same directory, synced, then renamed over the target).

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use super::SecurityError;

/// Creates `dir` (and missing parents) with mode 0700, and tightens it if it exists.
pub fn private_dir(dir: &Path) -> Result<(), SecurityError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| SecurityError::io(dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| SecurityError::io(dir, e))
}

/// Writes `contents` to `path` with mode 0600, atomically.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), SecurityError> {
    write_with_mode(path, contents, 0o600)
}

/// Writes a file others may read (certificates, public JWTs), atomically.
pub fn write_public(path: &Path, contents: &[u8]) -> Result<(), SecurityError> {
    write_with_mode(path, contents, 0o644)
}

fn write_with_mode(path: &Path, contents: &[u8], mode: u32) -> Result<(), SecurityError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode given to open() is masked by the umask; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| SecurityError::io(path, e))
}

/// Reads a file holding a secret; refuses one that others can read.
pub fn read_private(path: &Path) -> Result<String, SecurityError> {
    let meta = fs::metadata(path).map_err(|e| SecurityError::io(path, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(SecurityError::Invalid(format!(
            "{} is readable by other users (mode {:o}); run `chmod 600 {}`",
            path.display(),
            meta.permissions().mode() & 0o777,
            path.display()
        )));
    }
    fs::read_to_string(path).map_err(|e| SecurityError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_0600_in_0700_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        private_dir(&dir).unwrap();
        let file = dir.join("k.nk");
        write_private(&file, b"SUsecret").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&file), 0o600);
        assert_eq!(read_private(&file).unwrap(), "SUsecret");
        write_private(&file, b"SUother").unwrap();
        assert_eq!(read_private(&file).unwrap(), "SUother");
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_private(&file).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
    }
}
