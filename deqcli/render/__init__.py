"""Everything that draws or writes output: the terminal reports, tables, plots and the safe writing of
result files. Knows results and analysis records, not configs, solvers or the command line.
"""
