"""The table `make bench` prints: every figure with its target, then the GPU path's figures."""

from __future__ import annotations

TARGETS = {"our_loop_vs_plain": ">= 0.95", "loader_vs_trainer": ">= 20",
           "loader_chunked_vs_trainer": ">= 20", "dvc_repro_up_to_date_s": "<= 2 s",
           "reflow_run_up_to_date_s": "<= 15 s", "pair_generation_peak_mib": "10N within 10 % of N",
           "make_demo_s": "<= 1200 s with install", "dit_train_mfu": ">= 0.45 on H100/H200 (DiT-B/2, bf16)"}

Row = tuple[str, str, str]  # (figure, value shown, target)


def _shown(value) -> str:
    """A figure as the table shows it: a median, a number, the pair-memory summary, or as it is."""
    if isinstance(value, dict) and "median" in value:
        return f"{value['median']:.4g}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict) and "ratio_10n_vs_n" in value:
        return f"{value['at_n']:.0f} MiB at N={value['n']}, {value['at_10n']:.0f} MiB at 10N " \
               f"(x{value['ratio_10n_vs_n']:.3f})"
    return str(value)


def _gpu_rows(gpu: dict) -> list[Row]:
    def show(v) -> str:
        return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    rows = []
    f = gpu["flops"]
    rows.append(("gpu_path: DiT", f"{f['tokens']} tokens x {f['hidden']} hidden, {f['forward_gmac']:.4g} GMAC "
                 f"forward, {f['train_gflop_per_image']:.4g} GFLOP per trained image, batch {gpu['batch_size']}",
                 ""))
    for name, v in gpu["images_per_s"].items():
        mfu = gpu.get("mfu", {}).get(name)
        rows.append((f"gpu_path: {name} images/s", f"{v['median']:.4g}"
                     + (f" (MFU {100 * mfu:.1f} % of {gpu['peak_tflops']:g} TFLOP/s)" if mfu else ""),
                     ">= 45 % MFU on H100/H200" if name == "bf16_sdpa_fused" and mfu else ""))
    for name, v in gpu["first_step_s"].items():
        if isinstance(v, str):
            rows.append((f"gpu_path: {name}", v, ""))
    for key in ("bf16_vs_fp32", "tf32_vs_fp32", "sdpa_vs_math_attention", "fused_vs_foreach_adamw",
                "compile_vs_eager", "compile_s", "compile_break_even_steps"):
        if key in gpu:
            rows.append((f"gpu_path: {key}", show(gpu[key]), ""))
    g = gpu["generation"]
    for name in ("fp32", "fp32_tf32", "bf16"):
        if f"{name}_pairs_per_s" in g:
            rows.append((f"gpu_path: teacher pairs/s, {name}", f"{g[f'{name}_pairs_per_s']:.4g} "
                         f"({g[f'{name}_forwards_per_s']['median']:.4g} forwards/s at batch {g['batch']})", ""))
    return rows


def table(results: dict) -> str:
    rows = [(key, _shown(value), TARGETS.get(key, "")) for key, value in results["figures"].items()
            if key != "gpu_path"]
    gpu = results["figures"].get("gpu_path")
    if gpu:
        rows += _gpu_rows(gpu)
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k.ljust(width)}  {v}  {('target ' + t) if t else ''}".rstrip() for k, v, t in rows)
