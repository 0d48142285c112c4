//! Bodies streamed through the proxy frame by frame (never buffered whole), counting their bytes,
//! and telling their owner once how they ended, for metrics and the access log.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

/// The error type of bodies the proxy sends on: any body error, boxed.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body of any origin, as the proxy forwards it.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// How a body ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Every frame was passed on; `trailers` holds the trailers' `grpc-status`, if any.
    Complete {
        /// `grpc-status` from the trailers.
        grpc_status: Option<String>,
    },
    /// The body failed (a reset, a broken connection).
    Failed,
    /// The reader dropped it before its end (the client went away).
    Abandoned,
}

/// Called once with how the body ended.
pub type OnEnd = Box<dyn FnOnce(End) + Send>;

/// `inner`, counting data bytes into a shared counter and reporting its end once.
pub struct Metered<B> {
    inner: B,
    bytes: Arc<AtomicU64>,
    on_end: Option<OnEnd>,
    /// The body had nothing to send: hyper may drop it unpolled, which is not an abandonment.
    empty: bool,
}

impl<B: Body> Metered<B> {
    /// Counts `inner`'s data into `bytes`; `on_end`, if given, hears how it ended.
    pub fn new(inner: B, bytes: Arc<AtomicU64>, on_end: Option<OnEnd>) -> Self {
        let empty = inner.is_end_stream();
        Self { inner, bytes, on_end, empty }
    }
}

impl<B> Metered<B> {
    fn end(&mut self, end: End) {
        if let Some(f) = self.on_end.take() {
            f(end);
        }
    }
}

impl<B> Drop for Metered<B> {
    fn drop(&mut self) {
        let end = if self.empty { End::Complete { grpc_status: None } } else { End::Abandoned };
        self.end(end);
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.end(End::Complete { grpc_status: None });
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.end(End::Failed);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    // hyper stops polling once the body says it is done (Content-Length reached).
                    if self.inner.is_end_stream() {
                        self.end(End::Complete { grpc_status: None });
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    let grpc_status = grpc_status(trailers);
                    // Trailers are the last frame: the body is complete once they are passed on.
                    self.end(End::Complete { grpc_status });
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The `grpc-status` of a header or trailer block.
pub fn grpc_status(headers: &HeaderMap) -> Option<String> {
    headers.get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http_body_util::{BodyExt, Full};

    use super::*;

    #[tokio::test]
    async fn bytes_are_counted_and_the_end_reported_once() {
        let bytes = Arc::new(AtomicU64::new(0));
        let ends = Arc::new(Mutex::new(Vec::new()));
        let seen = ends.clone();
        let body = Metered::new(
            Full::new(Bytes::from_static(b"hello")),
            bytes.clone(),
            Some(Box::new(move |e| seen.lock().unwrap().push(e))),
        );
        assert_eq!(body.size_hint().exact(), Some(5), "framing survives the wrapper");
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"hello");
        assert_eq!(bytes.load(Ordering::Relaxed), 5);
        assert_eq!(*ends.lock().unwrap(), [End::Complete { grpc_status: None }]);
    }

    #[tokio::test]
    async fn trailers_end_the_body_with_their_grpc_status() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "5".parse().unwrap());
        let frames = Frames([Frame::data(Bytes::from_static(b"x")), Frame::trailers(trailers)].into());
        let ends = Arc::new(Mutex::new(Vec::new()));
        let seen = ends.clone();
        let body =
            Metered::new(frames, Arc::default(), Some(Box::new(move |e| seen.lock().unwrap().push(e))));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "5");
        assert_eq!(*ends.lock().unwrap(), [End::Complete { grpc_status: Some("5".into()) }]);
    }

    #[test]
    fn an_empty_body_dropped_unpolled_is_complete() {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let seen = ends.clone();
        let empty = http_body_util::Empty::<Bytes>::new();
        drop(Metered::new(empty, Arc::default(), Some(Box::new(move |e| seen.lock().unwrap().push(e)))));
        assert_eq!(*ends.lock().unwrap(), [End::Complete { grpc_status: None }]);
    }

    #[test]
    fn a_body_dropped_early_is_abandoned() {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let seen = ends.clone();
        drop(Metered::new(
            Full::new(Bytes::from_static(b"unsent")),
            Arc::default(),
            Some(Box::new(move |e| seen.lock().unwrap().push(e))),
        ));
        assert_eq!(*ends.lock().unwrap(), [End::Abandoned]);
    }

    /// A body of ready frames.
    struct Frames(std::collections::VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }
}
