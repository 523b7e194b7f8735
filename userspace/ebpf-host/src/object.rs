//! Loading `target/ebpf/ftvm-ebpf` and taking typed programs and maps out of it.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::{IterableMap, Map, MapError};
use aya::programs::{Program, ProgramError};
use aya::{Ebpf, EbpfError, Pod};

/// Why the eBPF object or one of its parts could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("Cannot read the eBPF object {path} (build it with `cargo xtask build-ebpf`)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot load the eBPF object {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<EbpfError>,
    },
    #[error("The eBPF object has no program {0} (an older object? rebuild it)")]
    MissingProgram(&'static str),
    #[error("The eBPF object's program {name} is not of the expected type")]
    ProgramType {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("The kernel refused program {name}")]
    Verify {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("The eBPF object has no map {0} (an older object? rebuild it)")]
    MissingMap(&'static str),
    #[error("Cannot duplicate the fd of map {name}")]
    MapFd {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("The eBPF object's map {name} is not of the expected type")]
    MapType {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// Reads and loads the object (maps are created in the kernel; programs are not loaded yet).
pub(crate) fn load(path: &Path) -> Result<Ebpf, ObjectError> {
    let bytes = std::fs::read(path).map_err(|source| ObjectError::Read { path: path.to_path_buf(), source })?;
    Ebpf::load(&bytes).map_err(|source| ObjectError::Parse { path: path.to_path_buf(), source: Box::new(source) })
}

/// The program `name`, converted to `T` and loaded into the kernel.
pub(crate) fn load_program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, ObjectError>
where
    T: Loadable,
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(ObjectError::MissingProgram(name))?;
    let typed: &mut T = program.try_into().map_err(|source| ObjectError::ProgramType { name, source })?;
    typed.load_into_kernel().map_err(|source| ObjectError::Verify { name, source })?;
    Ok(typed)
}

/// Takes map `name` out of the object, typed as `M`; the map stays alive as long as `M` does.
pub(crate) fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, ObjectError>
where
    M: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(ObjectError::MissingMap(name))?;
    M::try_from(map).map_err(|source| ObjectError::MapType { name, source })
}

/// A duplicate (close-on-exec) of the fd of `map` (map `name` of the object), to hand to a child
/// process.
pub(crate) fn dup_map_fd<K: Pod, V>(map: &impl IterableMap<K, V>, name: &'static str) -> Result<OwnedFd, ObjectError> {
    map.map().fd().as_fd().try_clone_to_owned().map_err(|source| ObjectError::MapFd { name, source })
}

/// The program types we load (aya gives each its own `load`).
pub(crate) trait Loadable {
    fn load_into_kernel(&mut self) -> Result<(), ProgramError>;
}

impl Loadable for aya::programs::Xdp {
    fn load_into_kernel(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

impl Loadable for aya::programs::SchedClassifier {
    fn load_into_kernel(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}
