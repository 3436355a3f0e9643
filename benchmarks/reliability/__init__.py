"""`make reliability`: what the served EVF-SAM does under long load, overload, client deadlines, killed
processes, malformed requests and mixed batches (issue 11).  Entry point: `python -m benchmarks.reliability`.

One module per scenario (soak, overload, goodput, faults, fuzz, cobatch); `inputs` builds requests
for the raw `tritonclient` API, `probes` reads what the server says about itself, `report` writes
summary.md and the plots.  tests/test_reliability.py runs the fast subset against real servers.
"""
