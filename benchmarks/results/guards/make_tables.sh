#!/bin/bash
# Regenerates the tables of benchmarks/results/guards/README.md from the run folders the configs under
# configs/cpu/guards/ write (run them first; seeds by train.seed=N output_dir=..._seedN).
set -e
C="python benchmarks/compare_runs.py"
R=runs/guards
$C $R/quickstart_long $R/quickstart_long_seed1 $R/quickstart_guarded $R/quickstart_guarded_seed1 \
   $R/quickstart_kl $R/quickstart_kl_seed1 \
   --metrics reward extra/shapes_match extra/shapes_color extra/shapes_count --out benchmarks/results/guards/guard_kl.md
$C $R/ddpo_color $R/ddpo_count $R/ddpo_color_count $R/ddpo_color_count_seed1 $R/ddpo_color_count_seed2 \
   $R/ddpo_color_count_pareto $R/ddpo_color_count_pareto_seed1 $R/ddpo_color_count_pareto_seed2 \
   $R/ddpo_color_count_pareto_prompt $R/ddpo_color_count_pareto_prompt_seed1 $R/ddpo_color_count_pareto_prompt_seed2 \
   --metrics reward/shapes_color_soft extra/shapes_color extra/shapes_count extra/shapes_match diversity \
   --out benchmarks/results/guards/pareto.md
$C $R/draft_color_clip $R/draft_color_clip_seed1 $R/draft_color_clip_balanced $R/draft_color_clip_balanced_seed1 $R/draft_clip \
   --metrics reward/shapes_color_soft reward/clip extra/shapes_match extra/shapes_color extra/shapes_count \
   --out benchmarks/results/guards/balance.md
