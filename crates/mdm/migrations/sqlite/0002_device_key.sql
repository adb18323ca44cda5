-- The device's ed25519 public key (hex), which signs its command results.
ALTER TABLE devices ADD COLUMN public_key TEXT NOT NULL DEFAULT '';
