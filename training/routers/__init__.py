"""Every router the evaluation compares: `base` (the interface and its tuning), `baselines` and `finerouter`
(FineRouter and its ablations). The evaluation's registry joins the last two."""
