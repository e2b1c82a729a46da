"""Where events are stored: a tracking server over MLflow's REST API, or the local SQLite journal."""
