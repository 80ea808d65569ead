"""A lean HTTP/1.1 client for the router's own hops to engines: the response head's framing
(shared by the scraper and the proxy) and a pooled, streaming request client."""
