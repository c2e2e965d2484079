"""The status page served at ``/``: one self-contained HTML file, no external assets.

It polls ``/v1/history`` every second and draws line charts on canvases: staleness (seconds,
per table), ingest rate (rows/s), cache hit ratio, applied version, and predict traffic.
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>streamhps inference server</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#0f1419;color:#e6e6e6}
 header{padding:14px 22px;background:#161d26;border-bottom:1px solid #263040;display:flex;gap:22px;align-items:baseline;flex-wrap:wrap}
 h1{font-size:18px;margin:0;font-weight:600}
 .pill{padding:3px 10px;border-radius:12px;font-size:13px;font-weight:600}
 .ok{background:#1f6f3f;color:#d7ffe4}.bad{background:#8a2630;color:#ffe0e3}.wait{background:#6b5a1e;color:#fff4cf}
 .kv{font-size:13px;color:#9fb0c3}.kv b{color:#e6e6e6;font-weight:600}
 main{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:16px;padding:16px 22px}
 .card{background:#161d26;border:1px solid #263040;border-radius:8px;padding:10px 14px}
 .card h2{font-size:14px;margin:2px 0 6px;font-weight:600;color:#c9d4e0}
 .card .now{float:right;font-size:14px;color:#fff;font-variant-numeric:tabular-nums}
 canvas{width:100%;height:190px;display:block}
 .legend{font-size:12px;color:#9fb0c3;margin-top:4px}.legend span{margin-right:12px}
 #reason{color:#ffb3b9;font-size:13px}
</style></head><body>
<header><h1>streamhps inference server</h1><span id="ready" class="pill wait">connecting</span>
<span class="kv">dense model <b id="dense">-</b></span><span class="kv">applied version <b id="applied">-</b></span>
<span class="kv">bound <b id="bound">-</b></span><span class="kv">uptime <b id="uptime">-</b></span>
<span id="reason"></span></header>
<main>
 <div class="card"><h2>Staleness (s, worst partition per table)<span class="now" id="n_stale"></span></h2><canvas id="c_stale"></canvas><div class="legend" id="l_stale"></div></div>
 <div class="card"><h2>Ingest rate (rows/s)<span class="now" id="n_ingest"></span></h2><canvas id="c_ingest"></canvas><div class="legend" id="l_ingest"></div></div>
 <div class="card"><h2>Cache hit ratio<span class="now" id="n_hit"></span></h2><canvas id="c_hit"></canvas><div class="legend" id="l_hit"></div></div>
 <div class="card"><h2>Applied version (min over partitions)<span class="now" id="n_ver"></span></h2><canvas id="c_ver"></canvas><div class="legend" id="l_ver"></div></div>
 <div class="card"><h2>Requests (per s)<span class="now" id="n_req"></span></h2><canvas id="c_req"></canvas><div class="legend" id="l_req"></div></div>
 <div class="card"><h2>Versions behind (worst partition per table)<span class="now" id="n_behind"></span></h2><canvas id="c_behind"></canvas><div class="legend" id="l_behind"></div></div>
</main>
<script>
const COLORS=["#4fc3f7","#ffb74d","#81c784","#e57373","#ba68c8","#fff176"];
function fmt(v){if(v===null||v===undefined||isNaN(v))return "-";const a=Math.abs(v);
 if(a>=1e6)return (v/1e6).toFixed(2)+"M";if(a>=1e4)return (v/1e3).toFixed(1)+"k";if(a>=100)return v.toFixed(0);if(a>=1)return v.toFixed(2);return v.toFixed(3);}
function draw(id,t,series,opts){
 const c=document.getElementById("c_"+id),dpr=window.devicePixelRatio||1,w=c.clientWidth,h=c.clientHeight;
 c.width=w*dpr;c.height=h*dpr;const g=c.getContext("2d");g.scale(dpr,dpr);g.clearRect(0,0,w,h);
 const L=52,R=8,T=8,B=20,pw=w-L-R,ph=h-T-B;let lo=Infinity,hi=-Infinity;
 for(const s of series)for(const v of s.v)if(v!==null&&isFinite(v)){lo=Math.min(lo,v);hi=Math.max(hi,v);}
 if(opts.min!==undefined)lo=Math.min(opts.min,isFinite(lo)?lo:opts.min);if(opts.max!==undefined)hi=Math.max(opts.max,isFinite(hi)?hi:opts.max);
 if(!isFinite(lo)){lo=0;hi=1;}if(hi-lo<1e-9){hi=lo+1;}
 const t0=t.length?t[0]:0,t1=t.length?t[t.length-1]:1,span=Math.max(t1-t0,1);
 const X=x=>L+(x-t0)/span*pw,Y=y=>T+ph-(y-lo)/(hi-lo)*ph;
 g.strokeStyle="#263040";g.fillStyle="#7d8ea3";g.font="11px system-ui";g.lineWidth=1;
 for(let i=0;i<=4;i++){const y=lo+(hi-lo)*i/4,py=Y(y);g.beginPath();g.moveTo(L,py);g.lineTo(w-R,py);g.stroke();g.fillText(fmt(y),4,py+4);}
 g.fillText("-"+Math.round(span)+" s",L,h-5);g.fillText("now",w-R-22,h-5);
 if(opts.bound!==undefined&&opts.bound<=hi){g.strokeStyle="#e57373";g.setLineDash([5,4]);g.beginPath();g.moveTo(L,Y(opts.bound));g.lineTo(w-R,Y(opts.bound));g.stroke();g.setLineDash([]);}
 series.forEach((s,k)=>{g.strokeStyle=COLORS[k%COLORS.length];g.lineWidth=2;g.beginPath();let pen=false;
  for(let i=0;i<t.length;i++){const v=s.v[i];if(v===null||!isFinite(v)){pen=false;continue;}
   if(!pen){g.moveTo(X(t[i]),Y(v));pen=true;}else g.lineTo(X(t[i]),Y(v));}g.stroke();});
 document.getElementById("l_"+id).innerHTML=series.map((s,k)=>'<span style="color:'+COLORS[k%COLORS.length]+'">&#9632; '+s.name+"</span>").join("")+(opts.bound!==undefined?'<span style="color:#e57373">- - bound</span>':"");
 const last=series.map(s=>s.v.length?s.v[s.v.length-1]:null).filter(v=>v!==null&&isFinite(v));
 document.getElementById("n_"+id).textContent=last.length?fmt(opts.agg==="max"?Math.max(...last):opts.agg==="sum"?last.reduce((a,b)=>a+b,0):Math.min(...last)):"-";
}
function perTable(samples,key){const names=new Set();for(const s of samples)for(const k in (s[key]||{}))names.add(k);
 return [...names].sort().map(n=>({name:n,v:samples.map(s=>(s[key]||{})[n]??null)}));}
async function tick(){
 try{const r=await fetch("/v1/history?seconds=300",{cache:"no-store"});const d=await r.json();const S=d.samples||[];
  const now=S.length?S[S.length-1]:{};const t=S.map(s=>s.t-(now.t||0));
  const rd=document.getElementById("ready");rd.textContent=d.ready?"ready":"not ready";rd.className="pill "+(d.ready?"ok":"bad");
  document.getElementById("reason").textContent=d.ready?"":(d.reason||"");
  document.getElementById("dense").textContent=d.dense_version??"none yet";
  document.getElementById("bound").textContent=d.max_staleness_s+" s";
  document.getElementById("uptime").textContent=Math.round(d.uptime_s)+" s";
  const av=Object.values(now.applied_version||{});document.getElementById("applied").textContent=av.length?Math.min(...av):"-";
  draw("stale",t,perTable(S,"staleness_s"),{min:0,bound:d.max_staleness_s,agg:"max"});
  draw("ingest",t,perTable(S,"ingest_rows_per_s"),{min:0,agg:"sum"});
  draw("hit",t,perTable(S,"hit_ratio"),{min:0,max:1,agg:"min"});
  draw("ver",t,perTable(S,"applied_version"),{agg:"min"});
  draw("req",t,[{name:"lookup",v:S.map(s=>s.lookups_per_s)},{name:"predict",v:S.map(s=>s.predicts_per_s)},{name:"errors",v:S.map(s=>s.errors_per_s)}],{min:0,agg:"sum"});
  draw("behind",t,perTable(S,"versions_behind"),{min:0,agg:"max"});
 }catch(e){const rd=document.getElementById("ready");rd.textContent="server unreachable";rd.className="pill bad";}
}
tick();setInterval(tick,1000);window.addEventListener("resize",tick);
</script></body></html>
"""
