//! The gRPC codec of both services: prost, with small per-stream buffers.
//!
//! tonic's default gives every stream an 8 KiB encode and an 8 KiB decode buffer up
//! front. A control plane holds one long-lived stream per sidecar, and what crosses it
//! is small (an ACK is tens of bytes; a snapshot a few KiB), so those buffers were a
//! third of the control plane's memory per connected sidecar. Buffers still grow to fit
//! a larger message; they only start small.

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Initial size of each stream's encode and decode buffer.
const BUFFER: usize = 1024;
/// tonic's default: how much is encoded before a streaming response yields.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`BUFFER`]-sized initial buffers; named by `build.rs`.
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec(std::marker::PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }
}
