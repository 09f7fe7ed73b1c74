"""Alert automations for the health flow, as code: llamacpp-alerts.yaml and its installer."""
