"""The command line: Hydra composes and checks a recipe run's config once, in the parent, then
launch/ starts it. compose (torch-free), checks (need torch), report (one line, exit 2), overlap
(composition in a forked child while torch imports)."""
