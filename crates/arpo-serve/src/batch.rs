//! Dynamic batching: a bounded queue of requests and the one thread that runs the engine.
//!
//! Handlers push jobs (a prepared prompt and its `n` choices) into a queue of fixed capacity; a
//! full queue is refused at once (503 + Retry-After), so memory never grows with load. The
//! engine thread takes as many waiting jobs as fit in `max_batch` sequences (same adapter),
//! generates them together, and streams every token back to its handler through a channel.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use arpo_core::SamplingParams;
use tokio::sync::mpsc;

use crate::engine::{Engine, EngineError, EngineFinish, Flow, GeneratedToken, SequenceRequest};
use crate::error::ApiError;
use crate::text::TextAssembler;

/// One choice of a job.
#[derive(Debug, Clone)]
pub(crate) struct ChoiceSpec {
    pub sampling: SamplingParams,
    pub top_logprobs: usize,
}

/// A request waiting for the engine.
#[derive(Debug)]
pub(crate) struct Job<P> {
    pub prompt: Arc<P>,
    pub adapter: Option<String>,
    pub choices: Vec<ChoiceSpec>,
    pub stops: Vec<String>,
    pub events: mpsc::UnboundedSender<Event>,
}

/// What the engine thread tells a handler.
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// A generated token and the text it completes (possibly empty).
    Token {
        choice: usize,
        delta: String,
        token: GeneratedToken,
    },
    /// The choice is done; `delta` is the text held back until now.
    Finished {
        choice: usize,
        delta: String,
        reason: &'static str,
        /// Prompt tokens the engine had cached.
        cached_tokens: usize,
    },
    Failed {
        error: EngineError,
    },
}

#[derive(Debug, Default)]
struct QueueState<P> {
    jobs: VecDeque<Job<P>>,
    shutdown: bool,
}

/// The bounded request queue.
#[derive(Debug)]
pub(crate) struct Queue<P> {
    state: Mutex<QueueState<P>>,
    ready: Condvar,
    capacity: usize,
    /// Sequences being generated right now.
    running: AtomicUsize,
}

impl<P> Queue<P> {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                shutdown: false,
            }),
            ready: Condvar::new(),
            capacity,
            running: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState<P>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a job, or refuses it at once when the queue is full.
    pub fn submit(&self, job: Job<P>) -> Result<(), ApiError> {
        let mut state = self.lock();
        if state.shutdown {
            return Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "server_shutting_down",
                "the server is shutting down",
            ));
        }
        if state.jobs.len() >= self.capacity {
            return Err(ApiError::queue_full(1));
        }
        state.jobs.push_back(job);
        drop(state);
        self.ready.notify_one();
        Ok(())
    }

    /// Jobs waiting (not yet running).
    pub fn waiting(&self) -> usize {
        self.lock().jobs.len()
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.ready.notify_all();
    }

    /// Blocks until there is work; takes the oldest job and every later job with the same
    /// adapter that still fits in `max_batch` sequences. `None` at shutdown.
    fn next_batch(&self, max_batch: usize) -> Option<Vec<Job<P>>> {
        let mut state = self.lock();
        loop {
            if state.shutdown {
                return None;
            }
            if !state.jobs.is_empty() {
                break;
            }
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        let first = state.jobs.pop_front()?;
        let mut size = first.choices.len();
        let adapter = first.adapter.clone();
        let mut batch = vec![first];
        let mut rest = VecDeque::with_capacity(state.jobs.len());
        while let Some(job) = state.jobs.pop_front() {
            if job.adapter == adapter && size + job.choices.len() <= max_batch {
                size += job.choices.len();
                batch.push(job);
            } else {
                rest.push_back(job);
            }
        }
        state.jobs = rest;
        Some(batch)
    }
}

/// Runs the engine thread until the queue shuts down.
pub(crate) fn spawn_engine_thread<E: Engine>(
    engine: Arc<E>,
    queue: Arc<Queue<E::Prompt>>,
    max_batch: usize,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("arpo-serve-engine".into())
        .spawn(move || {
            while let Some(jobs) = queue.next_batch(max_batch.max(1)) {
                let jobs: Vec<Job<E::Prompt>> =
                    jobs.into_iter().filter(|j| !j.events.is_closed()).collect();
                if jobs.is_empty() {
                    continue;
                }
                let size: usize = jobs.iter().map(|j| j.choices.len()).sum();
                queue.running.store(size, Ordering::Relaxed);
                run_batch(&*engine, &jobs);
                queue.running.store(0, Ordering::Relaxed);
            }
        })
}

struct SeqState {
    job: usize,
    choice: usize,
    text: TextAssembler,
    done: bool,
    /// Ended by a stop string (its `Finished` event is sent after the engine returns).
    stopped: bool,
}

fn run_batch<E: Engine>(engine: &E, jobs: &[Job<E::Prompt>]) {
    let mut requests = Vec::new();
    let mut seqs = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        for (c, choice) in job.choices.iter().enumerate() {
            requests.push(SequenceRequest {
                prompt: &*job.prompt,
                sampling: choice.sampling.clone(),
                top_logprobs: choice.top_logprobs,
                adapter: job.adapter.as_deref(),
            });
            seqs.push(SeqState {
                job: j,
                choice: c,
                text: TextAssembler::new(job.stops.clone()),
                done: false,
                stopped: false,
            });
        }
    }
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        engine.generate(&requests, &mut |i, token| {
            let Some(seq) = seqs.get_mut(i) else {
                return Flow::Stop;
            };
            if seq.done {
                return Flow::Stop;
            }
            let events = &jobs[seq.job].events;
            if events.is_closed() {
                seq.done = true;
                return Flow::Stop;
            }
            let pushed = seq.text.push(&engine.token_piece(token.id));
            let _ = events.send(Event::Token {
                choice: seq.choice,
                delta: pushed.delta,
                token: token.clone(),
            });
            if pushed.stop_hit {
                // Finished below, once the engine says how much of the prompt it had cached.
                seq.done = true;
                seq.stopped = true;
                Flow::Stop
            } else {
                Flow::Continue
            }
        })
    }));
    let results = match outcome {
        Ok(results) => results,
        Err(_) => vec![
            Err(EngineError::Generation(
                "the model engine panicked; see the server log".into()
            ));
            seqs.len()
        ],
    };
    for (i, seq) in seqs.iter_mut().enumerate() {
        if seq.done && !seq.stopped {
            continue;
        }
        let events = &jobs[seq.job].events;
        let result = results.get(i).cloned().unwrap_or_else(|| {
            Err(EngineError::Generation(
                "the engine returned fewer results than sequences".into(),
            ))
        });
        let event = match result {
            // A stop string ended it: what the engine did after does not matter.
            _ if seq.stopped => Event::Finished {
                choice: seq.choice,
                delta: String::new(),
                reason: "stop",
                cached_tokens: result.map_or(0, |f| f.cached_prompt_tokens),
            },
            Ok(finish) => Event::Finished {
                choice: seq.choice,
                delta: seq.text.finish(),
                reason: match finish.reason {
                    EngineFinish::Length => "length",
                    EngineFinish::EndOfTurn | EngineFinish::Stopped => "stop",
                },
                cached_tokens: finish.cached_prompt_tokens,
            },
            Err(error) => Event::Failed { error },
        };
        let _ = events.send(event);
    }
}
