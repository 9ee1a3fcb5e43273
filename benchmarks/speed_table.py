"""The README's speed table from the JSON that `hypir bench --speed` wrote (benchmarks/speed_run.sh), so that
the table and the committed results cannot drift apart:

    python3 benchmarks/speed_table.py benchmarks/results/2026-11-30-h200-speed/speed.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAMES = {
    "stock standard": "diffusers stock modules, standard attention",
    "stock sdpa": "diffusers stock modules, SDPA",
    "eager": "this project, eager, no CUDA graphs",
    "eager+graphs": "this project, default (CUDA graphs)",
    "pytorch-softmax": "default with PyTorch's softmax (`fused_softmax` off)",
}


def cells(row: dict, baseline: dict | None) -> list[str]:
    stages = row.get("stage_ms") or {}
    ratio = f"{baseline['total_ms'] / row['total_ms']:.2f}x" if baseline else ""
    psnr = row.get("psnr_db")
    return [f"{row['total_ms']:.1f}", *(f"{stages[s]:.1f}" if s in stages else "" for s in ("encode", "unet", "decode")),
            ratio, f"{row['peak_mib'] / 1024:.1f} GiB", f"{psnr:.1f} dB" if psnr is not None else ""]


def table(result: dict) -> str:
    lines = ["| output (input) | run | total ms | encode | UNet | decode | vs stock standard | peak GPU memory "
             "| PSNR vs float32 |", "|---|---|---|---|---|---|---|---|---|"]
    for size, entry in result["sizes"].items():
        rows = entry["rows"]
        baseline = rows.get("stock standard")
        baseline = baseline if baseline and not baseline.get("error") else None
        for name, row in rows.items():
            label = NAMES.get(name, name)
            if row.get("error"):
                lines.append(f"| {size} ({entry['input']}) | {label} | {row['error']} | | | | | | |")
                continue
            lines.append(f"| {size} ({entry['input']}) | {label} | " + " | ".join(cells(row, baseline)) + " |")
    budget = result.get("budget_4096")
    if budget and not budget.get("error"):
        tiles = f" (tiles {budget['tiles']})" if budget.get("tiles") else ""
        lines.append(f"| 4096 (2048) | this project, default, `--vram-budget {budget['budget_gb']:g}`{tiles} | "
                     + " | ".join(cells(budget, None)) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    args = parser.parse_args()
    result = json.loads(args.json.read_text())
    versions = ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items())
    print(f"{result['device']}, {versions}, {result['dtype']}, median of {result['repeats']} calls, {result['date']}")
    print()
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
