//! Device buffers in their dtype ([`DeviceBuf`]), and how an op reads one
//! in the dtype it computes in ([`Held`]: the buffer's own storage, or a
//! converted copy made by the cast kernels), following the storage rules
//! of [`DType`].

use super::{Buffer, DType, Error, Result};
use crate::backend::cuda::{CudaBackend, CudaError, Elem, GemmElem};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::bf16;
use std::ops::Deref;
use std::sync::Arc;

/// A device buffer: its elements (their count may be 0 while the
/// allocation holds at least one, as CUDA allocations cannot be empty) and
/// their type.
pub struct DeviceBuf {
    pub(super) len: usize,
    pub(super) storage: Storage,
}

/// The allocation behind a [`DeviceBuf`].
pub enum Storage {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

impl Buffer for DeviceBuf {
    fn len(&self) -> usize {
        self.len
    }
    fn dtype(&self) -> DType {
        match self.storage {
            Storage::F32(_) => DType::F32,
            Storage::Bf16(_) => DType::Bf16,
        }
    }
}

impl DeviceBuf {
    /// `len` f32 elements in `data` (which holds at least that many).
    pub fn from_f32(data: CudaSlice<f32>, len: usize) -> Self {
        debug_assert!(data.len() >= len);
        Self {
            len,
            storage: Storage::F32(data),
        }
    }

    /// `len` bf16 elements in `data` (which holds at least that many).
    pub fn from_bf16(data: CudaSlice<bf16>, len: usize) -> Self {
        debug_assert!(data.len() >= len);
        Self {
            len,
            storage: Storage::Bf16(data),
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The f32 storage (an error for a bf16 buffer).
    pub fn f32(&self) -> Result<&CudaSlice<f32>> {
        f32::own(self).ok_or_else(|| dtype_mismatch(DType::F32, DType::Bf16))
    }

    pub fn f32_mut(&mut self) -> Result<&mut CudaSlice<f32>> {
        f32::own_mut(self).ok_or_else(|| dtype_mismatch(DType::F32, DType::Bf16))
    }

    /// The bf16 storage (an error for an f32 buffer).
    pub fn bf16(&self) -> Result<&CudaSlice<bf16>> {
        bf16::own(self).ok_or_else(|| dtype_mismatch(DType::Bf16, DType::F32))
    }

    pub fn bf16_mut(&mut self) -> Result<&mut CudaSlice<bf16>> {
        bf16::own_mut(self).ok_or_else(|| dtype_mismatch(DType::Bf16, DType::F32))
    }
}

pub(super) fn dtype_mismatch(wanted: DType, found: DType) -> Error {
    Error::Device(CudaError::Unsupported {
        kernel: "op layer",
        reason: format!("a {wanted:?} buffer was expected, a {found:?} one was given"),
    })
}

/// A storage type of [`DeviceBuf`]: f32 or bf16.
pub trait Stored: Elem + GemmElem + DeviceRepr + ValidAsZeroBits + Unpin + 'static {
    const DTYPE: DType;
    fn own(buf: &DeviceBuf) -> Option<&CudaSlice<Self>>;
    fn own_mut(buf: &mut DeviceBuf) -> Option<&mut CudaSlice<Self>>;
    fn wrap(data: CudaSlice<Self>, len: usize) -> DeviceBuf;
    /// The values of `buf` (the other storage type) converted to this one.
    fn convert(be: &CudaBackend, buf: &DeviceBuf) -> Result<CudaSlice<Self>>;
    /// At least `n` ones.
    fn ones(be: &CudaBackend, n: usize) -> Result<Held<'static, Self>>;
}

impl Stored for f32 {
    const DTYPE: DType = DType::F32;
    fn own(buf: &DeviceBuf) -> Option<&CudaSlice<f32>> {
        match &buf.storage {
            Storage::F32(s) => Some(s),
            Storage::Bf16(_) => None,
        }
    }
    fn own_mut(buf: &mut DeviceBuf) -> Option<&mut CudaSlice<f32>> {
        match &mut buf.storage {
            Storage::F32(s) => Some(s),
            Storage::Bf16(_) => None,
        }
    }
    fn wrap(data: CudaSlice<f32>, len: usize) -> DeviceBuf {
        DeviceBuf::from_f32(data, len)
    }
    fn convert(be: &CudaBackend, buf: &DeviceBuf) -> Result<CudaSlice<f32>> {
        let mut out = be.stream().alloc_zeros::<f32>(buf.len.max(1))?;
        be.cast_bf16_to_f32(buf.bf16()?, buf.len, &mut out)?;
        Ok(out)
    }
    fn ones(be: &CudaBackend, n: usize) -> Result<Held<'static, f32>> {
        Ok(Held::Shared(be.ones(n)?))
    }
}

impl Stored for bf16 {
    const DTYPE: DType = DType::Bf16;
    fn own(buf: &DeviceBuf) -> Option<&CudaSlice<bf16>> {
        match &buf.storage {
            Storage::Bf16(s) => Some(s),
            Storage::F32(_) => None,
        }
    }
    fn own_mut(buf: &mut DeviceBuf) -> Option<&mut CudaSlice<bf16>> {
        match &mut buf.storage {
            Storage::Bf16(s) => Some(s),
            Storage::F32(_) => None,
        }
    }
    fn wrap(data: CudaSlice<bf16>, len: usize) -> DeviceBuf {
        DeviceBuf::from_bf16(data, len)
    }
    fn convert(be: &CudaBackend, buf: &DeviceBuf) -> Result<CudaSlice<bf16>> {
        let mut out = be.stream().alloc_zeros::<bf16>(buf.len.max(1))?;
        be.cast_f32_to_bf16(buf.f32()?, buf.len, &mut out)?;
        Ok(out)
    }
    fn ones(be: &CudaBackend, n: usize) -> Result<Held<'static, bf16>> {
        let ones = be.ones(n)?;
        let mut out = be.stream().alloc_zeros::<bf16>(n.max(1))?;
        be.cast_f32_to_bf16(&ones, n, &mut out)?;
        Ok(Held::Converted(out))
    }
}

/// A buffer's values in the storage type `T` an op computes in.
pub enum Held<'a, T> {
    /// The buffer's own storage (it is a `T` buffer).
    Own(&'a CudaSlice<T>),
    /// A converted copy (widened exactly, or rounded to nearest-even).
    Converted(CudaSlice<T>),
    /// A shared buffer (the cached ones of a bias gradient).
    Shared(Arc<CudaSlice<T>>),
}

impl<T> Deref for Held<'_, T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        match self {
            Self::Own(s) => s,
            Self::Converted(s) => s,
            Self::Shared(s) => s,
        }
    }
}

/// `buf` as `T` values.
pub(super) fn held<'a, T: Stored>(be: &CudaBackend, buf: &'a DeviceBuf) -> Result<Held<'a, T>> {
    match T::own(buf) {
        Some(s) => Ok(Held::Own(s)),
        None => Ok(Held::Converted(T::convert(be, buf)?)),
    }
}

/// A zeroed allocation of `n` `T` values (at least one, as CUDA needs).
pub(super) fn alloc<T: Stored>(be: &CudaBackend, n: usize) -> Result<CudaSlice<T>> {
    Ok(be.stream().alloc_zeros::<T>(n.max(1))?)
}

/// `data` (`n` values of `T`) as a buffer of `dtype`.
pub(super) fn store<T: Stored>(
    be: &CudaBackend,
    data: CudaSlice<T>,
    n: usize,
    dtype: DType,
) -> Result<DeviceBuf> {
    let buf = T::wrap(data, n);
    if dtype == T::DTYPE {
        return Ok(buf);
    }
    Ok(match dtype {
        DType::F32 => f32::wrap(f32::convert(be, &buf)?, n),
        DType::Bf16 => bf16::wrap(bf16::convert(be, &buf)?, n),
    })
}

/// At least `n` ones as `T` (for bias gradients: `db = ones @ dy`).
pub(super) fn ones<T: Stored>(be: &CudaBackend, n: usize) -> Result<Held<'static, T>> {
    T::ones(be, n)
}
