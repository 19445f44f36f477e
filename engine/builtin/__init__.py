"""The shipped built-in models' side: their data (sklearn digits, composed digit canvases, the digits
BAE), training (`python -m engine train`), evaluation (`python -m engine evaluate` / `geneval`)
and their weights (assets/, resolved by name in engine.loading). The sampling core never imports
this package."""
