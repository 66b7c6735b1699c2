"""What the benchmark scripts share: result rows and resumable grids (`rows`), markdown tables
(`tables`), alternating timed windows (`timing`), the synthetic and real data sets and teacher
files they measure on (`data`, `stamps`), the dense probe (`probe`), the recipe study's runs
(`recipes`) and the LightlyTrain side of it (`lightly`).

The scripts run as `python benchmarks/X.py`, so benchmarks/ is first on sys.path and this
package imports as `_bench` without any path set-up; a script imports this package, never
another script.
"""
