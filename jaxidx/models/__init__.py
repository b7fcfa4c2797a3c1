"""Pure-functional flax linen models (routers and encoders)."""
