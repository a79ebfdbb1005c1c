"""The HTTP app: `protocol` (the OpenAI request and response models), `serving` (what a request does),
`ingress` (the HTTP routes and the gate before them), `ranker` (the decision, made in the ingress), `deployments`
(the Embedder), `access`,
`app_config` (the `args` of `serve.config`) and `builder` (`build_app(args) -> Application`)."""


def __getattr__(name: str):
    # Configs written before the app had its own package name `serve.app:build_app`; it still resolves.
    if name == "build_app":
        from serve.app.builder import build_app

        return build_app
    raise AttributeError(name)
