"""Every router the evaluation knows, by the name the CLI and the reports use (`--routers`), in report order."""

from __future__ import annotations

from training.routers.base import Router
from training.routers.baselines import ClusterRouter, KNNRouter, MLPRouter, PriorRouter
from training.routers.cascade import AgreementCascade, CascadeRouter, FrugalCascade
from training.routers.finerouter import (
    FineRouter,
    FineRouterSemanticGraph,
    FineRouterStage1,
    FineRouterStage2,
)
from training.routers.reference import (
    BestSingleModel,
    CheapestModel,
    Oracle,
    RandomChoice,
    ZeroRouter,
)

ROUTERS: dict[str, type[Router]] = {
    "random": RandomChoice,
    "cheapest": CheapestModel,
    "best_single": BestSingleModel,
    "zero_router": ZeroRouter,
    "oracle": Oracle,
    "prior": PriorRouter,
    "knn": KNNRouter,
    "cluster": ClusterRouter,
    "mlp": MLPRouter,
    "finerouter": FineRouter,
    "finerouter_stage1": FineRouterStage1,
    "finerouter_stage2": FineRouterStage2,
    "finerouter_semantic_graph": FineRouterSemanticGraph,
    "cascade": CascadeRouter,
    "agreement_cascade": AgreementCascade,
    "frugal_cascade": FrugalCascade,
}


def router_class(name: str) -> type[Router]:
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}: use one of {', '.join(ROUTERS)}")
    return ROUTERS[name]
