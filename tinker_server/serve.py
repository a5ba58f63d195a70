"""Start SkyRL's Tinker API server (`skyrl.tinker.api`, JAX backend) from its own venv.

Run with that venv's Python (setup.sh makes it): `python serve.py --base-model DIR --port N
[any other EngineConfig flag]`. SkyRL's API process starts its engine by rebuilding the
`uv run ...` line it was itself started with, and fails when it was not; here the engine
is started with this same Python instead, the venv being set up already. Everything else
is SkyRL's own: its app, its engine, its flags (`EngineConfig`).
"""

import argparse
import sys

import uvicorn
from skyrl.tinker import api
from skyrl.tinker.config import EngineConfig, add_model, config_to_argv


def engine_command(parent_cmd: list[str], engine_config: EngineConfig) -> list[str]:
    return [sys.executable, "-m", "skyrl.tinker.engine", *config_to_argv(engine_config)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model(parser, EngineConfig)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    api.app.state.engine_config = EngineConfig.model_validate(
        {k: v for k, v in vars(args).items() if k in EngineConfig.model_fields})
    api._build_uv_run_cmd_engine = engine_command  # looked up by the app's start-up, at start-up
    uvicorn.run(api.app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
