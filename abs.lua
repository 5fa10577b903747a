wrk.path = "http://127.0.0.1:18901/"
