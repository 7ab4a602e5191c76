//! `cargo xtask sim-show`: a simulated task's screenshots (and its oracle's, step by step) as
//! PNG files, so a person can see what the agent sees. Also lists the catalogue and exports it
//! as OSWorld-style task JSON.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use arpo_core::ScreenSize;
use arpo_env_sim::{Catalogue, Session};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The task id (see --list).
    #[arg(long)]
    task: Option<String>,
    /// Also play the oracle solution and write a screenshot after every action.
    #[arg(long)]
    solve: bool,
    /// Where to write the PNG files.
    #[arg(long, default_value = "sim-show")]
    out: PathBuf,
    /// Screen size, WIDTHxHEIGHT (at least 336x224).
    #[arg(long, default_value = "336x224")]
    size: ScreenSize,
    /// Print every task id with its instruction and exit.
    #[arg(long)]
    list: bool,
    /// Write the catalogue as OSWorld-style task JSON (`examples/<family>/<id>.json`) and the
    /// indexes `train_all.json` / `heldout_all.json` into this folder, and exit.
    #[arg(long)]
    export_osworld: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let catalogue = Catalogue::default();
    if args.list {
        for s in catalogue
            .train_specs()
            .iter()
            .chain(catalogue.heldout_specs())
        {
            println!("{}\t{}", s.id, s.instruction);
        }
        return Ok(());
    }
    if let Some(dir) = &args.export_osworld {
        return export(&catalogue, dir);
    }
    let Some(id) = &args.task else {
        bail!("give --task <id> (or --list to see the ids)");
    };
    let task = catalogue.task(id)?;
    let (w, h) = args.size.pair();
    let mut session = Session::from_task(&task, w, h)?;
    let actions = if args.solve {
        session.oracle()?
    } else {
        Vec::new()
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut steps = Vec::new();
    let write = |session: &mut Session, n: usize| -> Result<PathBuf> {
        let shot = session.screenshot()?;
        let path = args.out.join(format!("{id}_{n:02}.png"));
        std::fs::write(&path, &shot.bytes)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    };
    println!("{id}: {}", task.instruction);
    println!("  {}", write(&mut session, 0)?.display());
    for (i, a) in actions.iter().enumerate() {
        if let Err(reason) = session.apply_action(a) {
            bail!("the oracle's action {a:?} was rejected: {reason}");
        }
        let path = write(&mut session, i + 1)?;
        println!("  {} after {}", path.display(), serde_json::to_string(a)?);
        steps.push(a.clone());
    }
    if args.solve {
        println!("reward: {}", session.reward(steps.last()));
    }
    Ok(())
}

fn export(catalogue: &Catalogue, dir: &std::path::Path) -> Result<()> {
    for s in catalogue
        .train_specs()
        .iter()
        .chain(catalogue.heldout_specs())
    {
        let folder = dir.join("examples").join(&s.family);
        std::fs::create_dir_all(&folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
        let json = serde_json::to_string_pretty(&Catalogue::osworld_json(s))?;
        std::fs::write(folder.join(format!("{}.json", s.id)), json)?;
    }
    for (name, specs) in [
        ("train_all.json", catalogue.train_specs()),
        ("heldout_all.json", catalogue.heldout_specs()),
    ] {
        let index = serde_json::to_string_pretty(&Catalogue::index(specs))?;
        std::fs::write(dir.join(name), index)?;
    }
    println!(
        "wrote {} tasks to {}",
        catalogue.train_specs().len() + catalogue.heldout_specs().len(),
        dir.display()
    );
    Ok(())
}
