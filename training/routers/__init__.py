"""Every router the evaluation compares, behind one interface (`base.Router`) and one registry
(`registry.ROUTERS`): `reference` (fixed choices, zero router, oracle), `baselines`, `finerouter` (FineRouter and
its ablations) and `cascade` (cascade routing and the fixed-chain cascades)."""
