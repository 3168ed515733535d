"""The agent's network adapters: MQTT (paho) and TUF artifact downloads (tuf.ngclient)."""
