"""What passes between devices: identity, discovery, pairing, secure transport, the device agent.

Never imports transformers or peft."""
