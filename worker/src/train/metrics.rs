//! What the trainer reports: one JSON object per line on stdout (read by
//! the daemon, or by a person piping to `jq`), or a progress bar when
//! stdout is a terminal.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

/// One report of the trainer; serialised with a `kind` field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// The run started (or resumed) at `step` of `total`.
    Start {
        /// First step to run.
        step: u64,
        /// Steps of the whole run.
        total: u64,
        /// Trainable parameters.
        params: i64,
    },
    /// Training metrics of one logged step.
    Step {
        /// Steps completed.
        step: u64,
        /// Loss of this step, averaged over ranks.
        loss: f64,
        /// Mean loss since the previous report.
        loss_avg: f64,
        /// Learning rate used.
        lr: f64,
        /// Weight decay used.
        wd: f64,
        /// EMA momentum used.
        momentum: f64,
        /// Images per second over all ranks since the previous report.
        images_per_s: f64,
        /// Share of wall time spent waiting for data since the previous report.
        data_wait: f64,
    },
    /// Effective rank of the target features.
    Rankme {
        /// Steps completed.
        step: u64,
        /// RankMe value.
        value: f64,
    },
    /// Linear-probe evaluation.
    Eval {
        /// Steps completed.
        step: u64,
        /// Top-1 of the average-pooled probe, in [0, 1].
        top1: f64,
        /// Top-1 of the pooled probe, when run.
        pooled_top1: Option<f64>,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// Steps completed.
        step: u64,
        /// The record file.
        path: String,
        /// SHA-256 of the weight file.
        sha256: String,
    },
    /// Rank 0 of a multi-rank run listens for its peers here (the daemon
    /// publishes the address through the coordinator's rendezvous).
    Listening {
        /// `host:port` of the collective's bootstrap listener.
        address: String,
    },
    /// The run ended.
    Done {
        /// Steps completed.
        step: u64,
        /// Whether it stopped early on a signal.
        interrupted: bool,
    },
}

/// Receives the trainer's events.
pub trait Sink {
    /// Handles one event.
    fn emit(&mut self, event: &Event);
}

/// Writes each event as a JSON line on stdout.
#[derive(Debug, Default)]
pub struct JsonLines;

impl Sink for JsonLines {
    fn emit(&mut self, event: &Event) {
        let mut out = std::io::stdout().lock();
        // A closed stdout (the daemon went away) must not kill training.
        let _ = serde_json::to_writer(&mut out, event);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }
}

/// Shows a progress bar with the latest loss and throughput.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar over `total` steps.
    pub fn new(total: u64) -> Self {
        let bar = ProgressBar::new(total);
        let style = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  eta {eta}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Progress { bar }
    }
}

impl Sink for Progress {
    fn emit(&mut self, event: &Event) {
        match event {
            Event::Start { step, .. } => self.bar.set_position(*step),
            Event::Step { step, loss_avg, images_per_s, lr, .. } => {
                self.bar.set_position(*step);
                self.bar.set_message(format!(
                    "loss {loss_avg:.4}  lr {lr:.2e}  {images_per_s:.0} img/s"
                ));
            }
            Event::Rankme { value, .. } => self.bar.println(format!("rankme {value:.2}")),
            Event::Eval { step, top1, pooled_top1 } => {
                let pooled =
                    pooled_top1.map(|p| format!(", pooled {:.2} %", 100.0 * p)).unwrap_or_default();
                self.bar.println(format!(
                    "step {step}: linear probe top-1 {:.2} %{pooled}",
                    100.0 * top1
                ));
            }
            Event::Checkpoint { step, path, .. } => {
                self.bar.println(format!("step {step}: checkpoint {path}"));
            }
            Event::Listening { address } => {
                self.bar.println(format!("rank 0 listening on {address}"))
            }
            Event::Done { .. } => self.bar.finish(),
        }
    }
}

/// Keeps events in memory, for tests and for callers that read them back.
#[derive(Debug, Default)]
pub struct Collect(pub Vec<Event>);

impl Sink for Collect {
    fn emit(&mut self, event: &Event) {
        self.0.push(event.clone());
    }
}

/// JSON lines when stdout is a pipe or `json` is set, else a progress bar.
pub fn stdout_sink(json: bool, total: u64) -> Box<dyn Sink> {
    if json || !std::io::stdout().is_terminal() {
        Box::new(JsonLines)
    } else {
        Box::new(Progress::new(total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_with_their_kind() {
        let event = Event::Rankme { step: 5, value: 2.5 };
        let line = serde_json::to_string(&event).unwrap();
        assert_eq!(line, r#"{"kind":"rankme","step":5,"value":2.5}"#);
        let back: Event = serde_json::from_str(&line).unwrap();
        assert_eq!(back, event);
    }
}
