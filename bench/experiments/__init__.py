"""Small seeded training experiments behind the claims report (issue 7): one module per claim family.

Each module has `run(tiny: bool, out_dir: Path) -> dict[str, Path]` and writes `<out>/exp_<name>.{json,md,png}`
through `bench.common.write_report`; `bench.run.BENCHMARKS` registers them as `exp_<name>`. The key
numbers the claims table reads are in the JSON's `meta.summary`. Shared data and model helpers are in
`bench.experiments.common`.
"""
