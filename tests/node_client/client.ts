// Driven by tests/test_node_client.py: a client generated at test time by openapi-typescript, called with
// openapi-fetch through the contract's /api prefix. `contract.d.ts` is generated from the contract file as
// given, `served.d.ts` from the document the server serves; tsc type-checks these calls against both before
// this runs. Prints one JSON object with what each call saw; the Python test judges it.
import createClient from "openapi-fetch";
import type { paths as ContractPaths } from "./contract.d.ts";
import type { paths as ServedPaths } from "./served.d.ts";

declare const process: { argv: string[] }; // (no @types/node: the one Node API used here)

const [base, token, expired, idc, product, imageId] = process.argv.slice(2);
const baseUrl = `${base}/api`; // configured like production: https://console.gmicloud.ai/api
const auth = (value: string) => ({ headers: { Authorization: `Bearer ${value}` } });

const contract = createClient<ContractPaths>({ baseUrl, ...auth(token) });
const served = createClient<ServedPaths>({ baseUrl, ...auth(token) });
const anonymous = createClient<ContractPaths>({ baseUrl });
const stale = createClient<ContractPaths>({ baseUrl, ...auth(expired) });

const out: Record<string, unknown> = {};

const all = await contract.GET("/v1/images");
out.all = { status: all.response.status, count: all.data?.length, url: all.response.url };

const filtered = await contract.GET("/v1/images", { params: { query: { idc, product } } });
out.filtered = {
  status: filtered.response.status,
  url: filtered.response.url,
  images: (filtered.data ?? []).map((image) => ({
    id: image.id,
    idc: image.idc,
    supportedProducts: image.supportedProducts,
    type: image.type,
  })),
};

const page = await served.GET("/v1/images", { params: { query: { limit: 1 } } });
out.page = { status: page.response.status, count: page.data?.length, link: page.response.headers.get("link") };

const one = await served.GET("/v1/images/{id}", { params: { path: { id: imageId } } });
out.one = { status: one.response.status, id: one.data?.id };

const invalid = await served.GET("/v1/images", { params: { query: { idc: "not an idc" } } });
out.invalid = { status: invalid.response.status, error: invalid.error };

const missing = await anonymous.GET("/v1/images");
out.missing = {
  status: missing.response.status,
  error: missing.error,
  wwwAuthenticate: missing.response.headers.get("www-authenticate"),
};

const expiredAnswer = await stale.GET("/v1/images");
out.expired = { status: expiredAnswer.response.status, error: expiredAnswer.error };

console.log(JSON.stringify(out));
