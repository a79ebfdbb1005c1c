"""A Serve app that does nothing: the floor of one HTTP request through Serve (the proxy and one replica), which
bench_route and bench_load measure beside the router."""

from fastapi import FastAPI
from ray import serve

api = FastAPI()


@serve.deployment(name="NoOp", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(api)
class NoOp:
    @api.post("/")
    async def nothing(self, body: dict) -> dict:
        return {}


app = NoOp.bind()
