"""Stage ``profile``: the exported program against its dense twins in the ExecuTorch
runtime, on the node that stands for the device (pipeline/profile).

Published into ``stage.profile.out_dir``:
  programs/       the dense twins' .pte (same total / same active parameters, random
                  weights, the export stage's path); a function of the config
  profile.json    every run's timestamps, medians and spreads, speed-ups, memory, the
                  bandwidth bound, the expert load, the machine
  report.md       the comparison tables and a plain verdict
  plots/          throughput.png (tok/s against length), expert_load.png
  metrics.json    speed-ups, the MoE's medians, fraction of the decode bound (DVC metrics)
Everything but programs/ is a timing or names the machine: uncached in dvc.yaml.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.recipe import repo_path
from pipeline.runner.cluster import DEVICE
from pipeline.runner.errors import ResourceError
from pipeline.runner.inputs import MixtureInput, ProgramInput, QuantizedModelInput, ThreadsInput, TokenizerInput
from pipeline.runner.spec import Dvc, Out, Stage, StageContext, StageResult, metric, uncached

KEY = "stage.profile"
OUTPUTS = ("programs", "profile.json", "report.md", "plots", "metrics.json")


def _inputs(recipe) -> list:
    from pipeline.runner.cluster import cluster_address

    cfg = recipe.stage.profile
    return [
        ThreadsInput(f"{KEY}.threads", cfg.threads, on_cluster=bool(cluster_address(recipe.ray))),
        ProgramInput(f"{KEY}.program", repo_path(cfg.program), cfg.longest_run, recipe.model.vocab_size),
        QuantizedModelInput(f"{KEY}.quantized", repo_path(cfg.quantized), recipe.model),
        MixtureInput(f"{KEY}.prompts_mixture", repo_path(cfg.prompts_mixture), cfg.longest_run),
        TokenizerInput(f"{KEY}.tokenizer", repo_path(cfg.tokenizer), recipe.model.vocab_size),
    ]


def _work(ctx: StageContext) -> StageResult:
    import ray

    from pipeline.export.kernels import beside
    from pipeline.profile.artifacts import profile_all
    from pipeline.runner import cluster, remote
    from pipeline.tracking.keys import flat_numbers

    recipe, cfg = ctx.recipe, ctx.recipe.stage.profile
    cluster.start(recipe.ray)
    if ray.cluster_resources().get(cluster.DEVICE, 0) < 1:
        raise ResourceError(
            f"no Ray node offers the '{cluster.DEVICE}' resource the profile runs on; start the device-like node "
            f"with: ray start --address=... --resources='{{\"{cluster.DEVICE}\": 1}}'"
        )
    # One task on the device node, holding as many CPUs as it runs threads.
    metrics, seconds = remote.call(
        recipe.ray,
        profile_all,
        cfg,
        recipe.model,
        remote.In(repo_path(cfg.program), beside=beside(cfg.program)),
        remote.In(repo_path(cfg.quantized)),
        remote.In(repo_path(cfg.prompts_mixture)),
        remote.In(repo_path(cfg.tokenizer)),
        remote.Out(ctx.scratch),
        num_cpus=cfg.threads,
        resources={cluster.DEVICE: 1},
    )

    def log(run, out_dir: Path) -> None:
        for item in ("metrics.json", "profile.json", "report.md"):
            run.log_artifact(out_dir / item)
        run.log_artifact(out_dir / "plots", "plots")
        run.log_artifact(out_dir / "programs", "programs")
        run.log_metrics(flat_numbers(metrics))

    return StageResult(metrics, log=log, perf={f"perf/{k}_seconds": v for k, v in seconds.items()})


PROFILE = Stage(
    name="profile",
    out_dir=lambda recipe: recipe.stage.profile.out_dir,
    inputs=_inputs,
    params=lambda raw: {"model": raw["model"], "stage": raw["stage"]["profile"]},
    work=_work,
    outputs=OUTPUTS,
    resources=lambda recipe: {"CPU": recipe.stage.profile.threads, DEVICE: 1},
    dvc=Dvc(
        order=70,
        desc="the .pte against its dense twins in the ExecuTorch runtime: TTFT, prefill/decode tok/s",
        code=(
            "pipeline/stages/profile.py",
            "pipeline/profile",
            "pipeline/export",
            "pipeline/model",
            "pipeline/quant",
            "pipeline/data/mixing.py",
            "pipeline/configbase.py",
            "pipeline/recipe.py",
        ),
        deps=(
            f"${{{KEY}.program}}",
            "${stage.export.out_dir}/model.kernels.json",  # the default program's kernel list
            f"${{{KEY}.quantized}}",
            f"${{{KEY}.prompts_mixture}}",
            f"${{{KEY}.tokenizer}}",
        ),
        params=("model", KEY),
        outs=(
            Out(f"${{{KEY}.out_dir}}/programs"),
            # Timings and the machine's name: never cached (a rerun measures again).
            uncached(f"${{{KEY}.out_dir}}/profile.json"),
            uncached(f"${{{KEY}.out_dir}}/report.md"),
            uncached(f"${{{KEY}.out_dir}}/plots"),
            metric(f"${{{KEY}.out_dir}}/metrics.json"),
        ),
    ),
)

STAGES = (PROFILE,)
