"""The ``roadcascade build`` sub-command (registered by cli.py through ``_COMMAND_MODULES``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..fit.config import BuildConfig
from .defaults import default_of, given


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command("build")
    def build_cmd(
        tiers: str = typer.Option(
            default_of(BuildConfig, "tiers"),
            help="tiers, cheapest first or any order: model@size[#tag][:bundle], tta(model@size[#tag][:bundle],n=a..b[,views=id|hflip|...]); "
                 "a tier without a bundle reuses another tier's weights of the same model, or is trained; #tag tells apart "
                 "tiers of one model and size from different bundles (seeds)",
        ),
        budget: str = typer.Option(default_of(BuildConfig, "budget"), help="mean compute per image: 35% (of the full ensemble), 0.35x, 2.5 (GFLOPs), 12ms"),
        out: Path = typer.Option(..., help="cascade bundle directory to write"),
        mode: str = typer.Option(default_of(BuildConfig, "mode"), help="mcc: best MCC under the budget | guaranteed: Learn-then-Test policy"),
        epsilon: float = typer.Option(default_of(BuildConfig, "epsilon"), help="guaranteed mode: max disagreement with the full ensemble"),
        delta: float = typer.Option(default_of(BuildConfig, "delta"), help="guaranteed mode: allowed probability of exceeding epsilon"),
        rules: str = typer.Option(",".join(default_of(BuildConfig, "rules")), help="deferral rules to search"),
        fusion: str = typer.Option(default_of(BuildConfig, "fusion"), help="stacking | vote"),
        orders: str = typer.Option(default_of(BuildConfig, "orders"), help="tier orders to search: cost | given | all"),
        data: Optional[str] = typer.Option(None, help="dataset (default StreetWork); fitting uses its val split only"),
        max_val: Optional[int] = typer.Option(None, help="fit on a stratified subset of this many val images"),
        n_views: int = typer.Option(default_of(BuildConfig, "n_views"), min=1, help="challenge views per val image"),
        work: Optional[Path] = typer.Option(None, help="work dir for trained tiers and the val cache (default <out>-work)"),
        device: str = typer.Option(default_of(BuildConfig, "device")),
        threads: Optional[int] = typer.Option(None, help="CPU threads for torch"),
        seed: int = typer.Option(default_of(BuildConfig, "seed")),
        epochs: int = typer.Option(default_of(BuildConfig, "train_epochs"), min=1, help="epochs for tiers that must be trained"),
        train_size: Optional[int] = typer.Option(None, help="training resolution for tiers that must be trained"),
        max_train: Optional[int] = typer.Option(None, help="train missing tiers on a subset of this many images"),
        max_steps: Optional[int] = typer.Option(None, help="stop training missing tiers after this many steps"),
    ) -> None:
        """Build a cascade: train missing tiers, cache val outputs, fit rules, fusion and policy, write a bundle."""
        from ..fit.build import build
        from .console import console, fail as _fail, progress_bar
        from ..io.data import DataError

        cfg = BuildConfig(**given(tiers=tiers, budget=budget, mode=mode, epsilon=epsilon, delta=delta,
                                  rules=tuple(r.strip() for r in rules.split(",") if r.strip()), fusion=fusion, orders=orders,
                                  data=data, max_val=max_val, n_views=n_views, work=str(work) if work else None, device=device,
                                  threads=threads, seed=seed, train_epochs=epochs, train_size=train_size, max_train=max_train,
                                  max_steps=max_steps))
        try:
            with progress_bar() as cb:
                res = build(cfg, out, progress=cb, log=console.print)
        except (ValueError, DataError, FileNotFoundError) as e:
            _fail(str(e))
        print_frontier(res.bundle.meta)

    _ = bench_app


def print_frontier(meta: dict, limit: int = 25) -> None:
    from rich.console import Console
    from rich.table import Table

    pol = meta["policy"]
    t = Table(title="MCC vs compute on val (out-of-fold); * = chosen")
    for c in ("", "mean GFLOPs", "% of full", "MCC", "accuracy", "disagree", "policy"):
        t.add_column(c, justify="right" if c not in ("policy", "") else "left")
    full = pol["full_ensemble"]["mean_gflops"] or 1.0
    rows = pol["frontier"]
    step = max(1, len(rows) // limit)
    shown = rows[::step]
    ch = pol["chosen"]
    if ch not in shown:
        shown = sorted(shown + [ch], key=lambda p: p["mean_gflops"])
    for p in shown:
        t.add_row("*" if p == ch else "", f"{p['mean_gflops']:.3f}", f"{p['mean_gflops'] / full:.0%}", f"{p['mcc']:.4f}",
                  f"{p['accuracy']:.4f}", f"{p['disagreement']:.4f}", p["describe"])
    Console().print(t)
    g = meta.get("guaranteed") or {}
    if g:
        Console().print(f"guaranteed (eps {g['epsilon']}, delta {g['delta']}): {g['policy']['describe']}  "
                        f"{g['policy']['mean_gflops']:.3f} GFLOPs/img, calibration disagreement {g['risk_cal']:.4f}, p {g['p_value']:.3g}")
