"""Work that reads problems and results and returns records: comparisons, sweeps, sensitivities and
gradient checks. Nothing here prints; the terminal reports, tables and plots live in ``deqcli.render``.
"""
