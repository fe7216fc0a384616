{
  "targets": [
    {
      "target_name": "qcow2_extents",
      "sources": ["extents.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
