// Uses the TypeScript client (openapi-typescript types + openapi-fetch) generated from the
// committed OpenAPI document against a live SEIDRA service. Type-checked strictly by tsc
// first, so the fields read below must exist in the generated types with these shapes.
//
//   BASE_URL=http://127.0.0.1:PORT TOKEN=<operator JWT> node .build/ts/out/client-check.js
//
// Two checks, one line each (`ok`/`FAIL`); exits with the number of failed checks:
//   authorised  GET /api/system/telemetry/generation with the bearer token: at least one item,
//               summary.total >= 1;
//   no token    the same call without a token: 401 with the documented ErrorBody.

import createClient from 'openapi-fetch';

import type { components, paths } from './.build/ts/schema.js';

type TelemetryResponse = components['schemas']['TelemetryResponse'];
type ErrorBody = components['schemas']['ErrorBody'];
// Fails to compile when openapi-fetch cannot see a JSON body (a `never` would accept anything).
type Exactly<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;

const baseUrl = process.env.BASE_URL;
const token = process.env.TOKEN;
if (!baseUrl || !token) {
  console.error('set BASE_URL and TOKEN');
  process.exit(2);
}

let failed = 0;
async function check(name: string, body: () => Promise<void>): Promise<void> {
  try {
    await body();
    console.log(`ok   typescript client: ${name}`);
  } catch (error) {
    failed += 1;
    console.log(`FAIL typescript client: ${name}: ${error instanceof Error ? error.message : String(error)}`);
  }
}

await check('authorised GET /api/system/telemetry/generation', async () => {
  const client = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${token}` } });
  const { data, error, response } = await client.GET('/api/system/telemetry/generation', {
    params: { query: { limit: 10 } },
  });
  const dataTyped: Exactly<NonNullable<typeof data>, TelemetryResponse> = true;
  void dataTyped;
  if (response.status !== 200 || data === undefined) {
    throw new Error(`status ${response.status}: ${JSON.stringify(error)}`);
  }
  const answer: TelemetryResponse = data;
  if (answer.items.length < 1) throw new Error('no item in the answer');
  if (answer.summary.total < 1) throw new Error(`summary.total is ${answer.summary.total}`);
  const first = answer.items[0];
  if (first === undefined) throw new Error('no first item');
  console.log(
    `     ${answer.items.length} item(s), summary.total=${answer.summary.total}, newest: ` +
      `${first.media_type} ${first.model_name} ${first.duration_seconds.toFixed(3)} s at ${first.created_at}`,
  );
});

await check('GET /api/system/telemetry/generation without a token is refused with 401', async () => {
  const client = createClient<paths>({ baseUrl });
  const { data, error, response } = await client.GET('/api/system/telemetry/generation');
  const errorTyped: Exactly<NonNullable<typeof error>, ErrorBody> = true;
  void errorTyped;
  if (response.status !== 401) throw new Error(`status ${response.status}, not 401`);
  if (data !== undefined) throw new Error('a 401 answer came back as data');
  const body: ErrorBody | undefined = error;
  if (body === undefined || typeof body.error !== 'string' || typeof body.message !== 'string') {
    throw new Error(`the 401 body is not an ErrorBody: ${JSON.stringify(error)}`);
  }
  console.log(`     401 ${body.error}: ${body.message}`);
});

process.exit(failed);
