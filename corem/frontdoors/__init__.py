"""The peers' device APIs (ThingsBoard, Drogue Cloud, EMQX) on corem's router, registry and bus."""
