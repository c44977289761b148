"""Score users with a cached model beside their features, both batched: a FastAPI endpoint.

    pip install 'featcache[server]' fastapi
    FEATCACHE_CONFIG=config/featcache.yaml \\
    SCORE_FEATURES=user_profile:age,user_profile:country,user_activity:sessions_7d \\
        uvicorn examples.fastapi_scoring:app --host 127.0.0.1 --port 8000

    curl -s localhost:8000/score -d '{"user_ids": [1, 2, 3]}'
    {"scores": [0.61, 0.47, 0.55], "statuses": ["HIT_REDIS", "COMPUTED", "HIT_L1"], ...}

One request is two batched reads: ``get_features`` (one Redis round trip for every user, SQL
for what Redis lacks) and ``get_or_compute`` on the model's cache (one round trip for every
user's score; the model runs once, on the users whose feature values it has not scored yet).
A user's score is keyed by the values of its features, not by its id, so a user whose features
changed is scored again, and users with equal features share one score. Publishing a new model
means a new ``SCORE_MODEL_VERSION``: a new namespace, nothing to delete.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from featcache import AsyncFeatureCache
from featcache.errors import InvalidRequest

FEATURES = [f for f in os.environ.get("SCORE_FEATURES", "").split(",") if f]
MODEL_VERSION = os.environ.get("SCORE_MODEL_VERSION", "1")


def predict(rows: list[dict[str, Any]]) -> list[float]:
    """The model: a fixed logistic score of the numeric features (absent ones count 0). A
    real service calls its model's batch predict here; it sees only the rows to score."""
    scores = []
    for row in rows:
        total = sum(float(v) for v in row.values()
                    if isinstance(v, int | float) and not isinstance(v, bool))
        scores.append(round(1 / (1 + math.exp(-total / 100)), 6))
    return scores


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if not FEATURES:
        raise RuntimeError("set SCORE_FEATURES to the features the model reads")
    async with AsyncFeatureCache.from_config(os.environ["FEATCACHE_CONFIG"]) as cache:
        app.state.cache = cache
        yield


app = FastAPI(lifespan=lifespan)


class ScoreRequest(BaseModel):
    user_ids: list[int] = Field(max_length=1000)


@app.post("/score")
async def score(request: ScoreRequest) -> dict[str, Any]:
    cache: AsyncFeatureCache = app.state.cache
    try:
        features = await cache.get_features(request.user_ids, FEATURES)
        scored = await cache.model("scorer", version=MODEL_VERSION).get_or_compute(
            features, compute=predict)  # one input per user: its feature values
    except InvalidRequest as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    return {"scores": list(scored), "statuses": [str(s) for s in scored.statuses],
            "feature_statuses": dict(features.status_counts())}
