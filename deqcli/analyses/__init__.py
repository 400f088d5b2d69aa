"""Work that reads problems and results and returns records: comparisons, sweeps, sensitivities and
gradient checks, and in ``jobs`` what each solving command does end to end. Nothing here prints a
report: the terminal reports, tables and plots, and the writing of files, live in ``deqcli.render``.
"""
